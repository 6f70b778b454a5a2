"""Multimodal rotary position embedding (M-RoPE, Qwen2-VL style).

A head of width Dh has Dh/2 rotary frequency pairs, frequency i = theta^(-2i/Dh). The pairs are
split into contiguous sections (t, h, w) = `rope_sections`; the pairs of a section are rotated by
that component of `positions`. Text has t = h = w, where M-RoPE equals a 1-D RoPE. Pairs are laid
out "half-rotated" (pair i is (x[i], x[i + Dh/2])), as in Llama / Qwen.
"""
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from omnimoe.model.config import check_rope


def rope_angles(positions_BxLx3: jax.Array, head_dim: int, sections: Sequence[int],
                theta: float) -> jax.Array:
  """Rotation angle of every pair: float32 [B, L, Dh/2]."""
  half = head_dim // 2
  check_rope(head_dim, sections)
  inv_freq_P = theta ** (-np.arange(half, dtype=np.float64) * 2.0 / head_dim)
  component_P = np.repeat(np.arange(len(sections)), sections)      # which of t/h/w per pair
  pos_BxLxP = jnp.take(positions_BxLx3.astype(jnp.float32), component_P, axis=-1)
  return pos_BxLxP * jnp.asarray(inv_freq_P, jnp.float32)


def apply_rope(x_BxLxHxD: jax.Array, angles_BxLxP: jax.Array) -> jax.Array:
  """Rotates every head of x by the angles (computed in float32, returned in x's dtype)."""
  B, L, H, D = x_BxLxHxD.shape
  cos = jnp.cos(angles_BxLxP)[:, :, None, None, :]
  sin = jnp.sin(angles_BxLxP)[:, :, None, None, :]
  x = x_BxLxHxD.astype(jnp.float32).reshape(B, L, H, 2, D // 2)    # halves (x1, x2)
  # (x1, x2) -> (-x2, x1) without a concatenate: flip the halves axis and negate the first.
  rotated = jnp.flip(x, axis=3) * jnp.asarray([-1.0, 1.0], jnp.float32)[:, None]
  return (x * cos + rotated * sin).reshape(B, L, H, D).astype(x_BxLxHxD.dtype)

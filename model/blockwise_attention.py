"""Blockwise (flash-style) causal, segment-masked GQA attention in pure JAX.

Forward: one `lax.scan` over key blocks with an online softmax (running max m, running sum l,
accumulator). Backward (custom VJP): a second scan over key blocks that recomputes the probabilities
from the saved log-sum-exp, so memory is linear in L in both directions (scores of one key block
at a time: [B, K, G, L, block]). Shapes: H = K * G query heads, K key/value heads, Dh head width.

Query i sees key j iff j <= i and segment_ids equal and nonzero; padding rows (segment 0) return 0.
"""
import functools

import jax
import jax.numpy as jnp

_NEG = -1e30  # finite "minus infinity": keeps fully masked rows free of NaN


def _blocks(x, nb, block):
  """[B, Lp, ...] -> [nb, B, block, ...] (scan axis first)."""
  return jnp.moveaxis(x.reshape(x.shape[0], nb, block, *x.shape[2:]), 1, 0)


def _mask(seg_q_BxL, seg_k_Bxb, start, L, block):
  """[B, 1, 1, L, block] boolean: causal, same segment, valid query."""
  q_pos = jnp.arange(L)[:, None]
  k_pos = start + jnp.arange(block)[None, :]
  same = (seg_q_BxL[:, :, None] == seg_k_Bxb[:, None, :]) & (seg_q_BxL[:, :, None] > 0)
  return (same & (k_pos <= q_pos)[None])[:, None, None]


def _prepare(q, k, v, seg, block):
  B, L, H, D = q.shape
  K = k.shape[2]
  nb = -(-L // block)
  pad = nb * block - L
  k_p = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
  v_p = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
  seg_k = jnp.pad(seg, ((0, 0), (0, pad)))
  q_BxKxGxLxD = q.reshape(B, L, K, H // K, D).transpose(0, 2, 3, 1, 4)
  xs = (_blocks(k_p, nb, block), _blocks(v_p, nb, block), _blocks(seg_k, nb, block),
        jnp.arange(nb) * block)
  return q_BxKxGxLxD, xs


def _forward(q, k, v, seg, block):
  B, L, H, D = q.shape
  scale = D ** -0.5
  q5, xs = _prepare(q, k, v, seg, block)
  K, G = q5.shape[1], q5.shape[2]

  def body(carry, x):
    m, l, acc = carry
    k_b, v_b, seg_b, start = x
    s = jnp.einsum("bkgld,bskd->bkgls", q5, k_b, preferred_element_type=jnp.float32) * scale
    mask = _mask(seg, seg_b, start, L, block)
    s = jnp.where(mask, s, _NEG)
    m_new = jnp.maximum(m, s.max(axis=-1))
    corr = jnp.exp(m - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    l = l * corr + p.sum(axis=-1)
    pv = jnp.einsum("bkgls,bskd->bkgld", p.astype(v_b.dtype), v_b,
                    preferred_element_type=jnp.float32)
    return (m_new, l, acc * corr[..., None] + pv), None

  init = (jnp.full((B, K, G, L), _NEG, jnp.float32), jnp.zeros((B, K, G, L), jnp.float32),
          jnp.zeros((B, K, G, L, D), jnp.float32))
  (m, l, acc), _ = jax.lax.scan(body, init, xs)
  has_keys = l > 0
  out5 = acc / jnp.where(has_keys, l, 1.0)[..., None]
  lse = jnp.where(has_keys, m + jnp.log(jnp.where(has_keys, l, 1.0)), 0.0)
  out = out5.transpose(0, 3, 1, 2, 4).reshape(B, L, H, D).astype(q.dtype)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def blockwise_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL, block: int):
  """Causal segment-masked attention, memory-linear in L (see module docstring)."""
  return _forward(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL, block)[0]


def _fwd(q, k, v, seg, block):
  out, lse = _forward(q, k, v, seg, block)
  return out, (q, k, v, seg, out, lse)


def _bwd(block, res, dout):
  q, k, v, seg, out, lse = res
  B, L, H, D = q.shape
  K = k.shape[2]
  G = H // K
  scale = D ** -0.5
  q5, xs = _prepare(q, k, v, seg, block)
  do5 = dout.reshape(B, L, K, G, D).transpose(0, 2, 3, 1, 4)
  o5 = out.reshape(B, L, K, G, D).transpose(0, 2, 3, 1, 4)
  delta = jnp.sum(do5.astype(jnp.float32) * o5.astype(jnp.float32), axis=-1)   # [B,K,G,L]

  def body(dq, x):
    k_b, v_b, seg_b, start = x
    s = jnp.einsum("bkgld,bskd->bkgls", q5, k_b, preferred_element_type=jnp.float32) * scale
    mask = _mask(seg, seg_b, start, L, block)
    p = jnp.where(mask, jnp.exp(jnp.where(mask, s, _NEG) - lse[..., None]), 0.0)
    dv_b = jnp.einsum("bkgls,bkgld->bskd", p.astype(do5.dtype), do5,
                      preferred_element_type=jnp.float32)
    dp = jnp.einsum("bkgld,bskd->bkgls", do5, v_b, preferred_element_type=jnp.float32)
    ds = (p * (dp - delta[..., None]) * scale).astype(q5.dtype)
    dq = dq + jnp.einsum("bkgls,bskd->bkgld", ds, k_b, preferred_element_type=jnp.float32)
    dk_b = jnp.einsum("bkgls,bkgld->bskd", ds, q5, preferred_element_type=jnp.float32)
    return dq, (dk_b, dv_b)

  dq5, (dk_n, dv_n) = jax.lax.scan(body, jnp.zeros(q5.shape, jnp.float32), xs)

  def unblock(x_n):  # [nb, B, block, K, D] -> [B, L, K, D]
    return jnp.moveaxis(x_n, 0, 1).reshape(B, -1, K, D)[:, :L]

  dq = dq5.transpose(0, 3, 1, 2, 4).reshape(B, L, H, D).astype(q.dtype)
  return dq, unblock(dk_n).astype(k.dtype), unblock(dv_n).astype(v.dtype), None


blockwise_attention.defvjp(_fwd, _bwd)

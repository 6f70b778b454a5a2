"""Causal, segment-masked GQA attention behind one function, `attend`.

Query i sees key j iff j <= i and segment_ids[i] == segment_ids[j] != 0. Rows of padding
(segment 0) see nothing and return exactly 0 (never NaN). H query heads share K key/value heads
(H = K * G). The softmax scale is Dh ** -0.5.

Backends:
  blockwise  pure JAX, online softmax over query x key tiles that skips tiles the causal mask or
             the segment ids hide entirely; memory-linear in L, custom VJP
  xla        one einsum softmax with an explicit [B, L, L] mask (fast for short L)
  cudnn      jax.nn.dot_product_attention(implementation="cudnn"): GPU, bf16/fp16 only; causal via
             is_causal, segments via an explicit boolean mask (cuDNN adds it as a bias)
  auto       cudnn on GPU with bfloat16; otherwise xla when L <= block, else blockwise
"""
import jax
import jax.numpy as jnp

from omnimoe.model.blockwise_attention import blockwise_attention

IMPLEMENTATIONS = ("auto", "blockwise", "xla", "cudnn")


def segment_mask(segment_ids_BxL: jax.Array) -> jax.Array:
  """Boolean [B, L, L]: query i may see key j."""
  seg = segment_ids_BxL
  L = seg.shape[1]
  causal = jnp.arange(L)[None, :] <= jnp.arange(L)[:, None]
  return (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0) & causal[None]


def _xla(q, k, v, seg):
  B, L, H, D = q.shape
  K = k.shape[2]
  # Head-major layouts ([B, K, G, L, D]) keep every matmul a plain batched matmul.
  q_BxKxGxLxD = (q * jnp.asarray(D ** -0.5, q.dtype)).reshape(B, L, K, H // K, D)
  q_BxKxGxLxD = q_BxKxGxLxD.transpose(0, 2, 3, 1, 4)
  k_BxKxLxD, v_BxKxLxD = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  s = jnp.einsum("bkgld,bksd->bkgls", q_BxKxGxLxD, k_BxKxLxD, preferred_element_type=jnp.float32)
  # Additive mask: masked scores become ~-1e30, so softmax gives exactly 0 for them in every row
  # that has a visible key (each valid query sees itself). Padding rows are zeroed at the end.
  s = s + jnp.where(segment_mask(seg), 0.0, -1e30)[:, None, None]
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  o = jnp.einsum("bkgls,bksd->bkgld", p, v_BxKxLxD, preferred_element_type=jnp.float32)
  o = o.transpose(0, 3, 1, 2, 4).reshape(B, L, H, D)
  return jnp.where((seg > 0)[:, :, None, None], o, 0).astype(q.dtype)


def _cudnn(q, k, v, seg):
  if jax.default_backend() != "gpu":
    raise ValueError("attention 'cudnn' needs a GPU; use 'auto', 'xla' or 'blockwise'")
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention 'cudnn' needs bfloat16/float16 inputs, got {q.dtype}; "
                     "set model.dtype=bfloat16 or use attention 'xla'/'blockwise'")
  same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
  out = jax.nn.dot_product_attention(q, k, v, mask=same[:, None], is_causal=True,
                                     implementation="cudnn")
  return jnp.where((seg > 0)[:, :, None, None], out, 0).astype(q.dtype)


def resolve_implementation(implementation: str, L: int, dtype, block: int) -> str:
  """The backend `auto` picks for this length, dtype and platform."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention {implementation!r}; choose from {IMPLEMENTATIONS}")
  if implementation != "auto":
    return implementation
  if jax.default_backend() == "gpu" and jnp.dtype(dtype) == jnp.bfloat16:
    return "cudnn"
  return "xla" if L <= block else "blockwise"


def attend(q_BxLxHxD: jax.Array, k_BxLxKxD: jax.Array, v_BxLxKxD: jax.Array,
           segment_ids_BxL: jax.Array, *, implementation: str = "auto",
           block: int = 128) -> jax.Array:
  """Causal segment-masked attention; returns [B, L, H, Dh] in q's dtype."""
  H, K = q_BxLxHxD.shape[2], k_BxLxKxD.shape[2]
  if H % K:
    raise ValueError(f"num_heads {H} must be a multiple of num_kv_heads {K}")
  seg = segment_ids_BxL.astype(jnp.int32)
  impl = resolve_implementation(implementation, q_BxLxHxD.shape[1], q_BxLxHxD.dtype, block)
  if impl == "blockwise":
    return blockwise_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, seg, block)
  if impl == "xla":
    return _xla(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, seg)
  return _cudnn(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, seg)

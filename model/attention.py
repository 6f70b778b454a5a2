"""Causal, segment-masked GQA attention behind one function, `attend` (one device's arrays).

Query i sees key j iff order[j] <= order[i] and segment_ids[i] == segment_ids[j] != 0 (and
order[i] - order[j] < window in a sliding-window layer: `window`, default NO_WINDOW = none), where
order is the 1-D position of a token in its row: the array index unless the batch carries an
`order` (rows reordered for context parallelism, model/context_parallel.py). Rows of padding
(segment 0) see nothing and return exactly 0 (never NaN). H query heads share K key/value heads
(H = K * G). The softmax scale is Dh ** -0.5. `attend_meta` takes queries and keys with their own
segment ids and orders (the keys may be a longer array: all of a row's keys gathered over devices).

Backends:
  blockwise  pure JAX, online softmax over query x key tiles that skips tiles the causal mask or
             the segment ids hide entirely; memory-linear in L, custom VJP
  xla        one einsum softmax with an explicit [B, Lq, Lk] mask (fast for short L)
  cudnn      jax.nn.dot_product_attention(implementation="cudnn"): GPU, bf16/fp16 only; causal via
             is_causal in array order (else an explicit mask), segments via an explicit boolean
             mask (cuDNN adds it as a bias)
  auto       cudnn on GPU with bfloat16 in array order, once it has passed bench/accelerator_check.py
             on that device kind and jax version (model/hardware_paths.py); otherwise xla when
             Lk <= block, else blockwise
"""
import jax
import jax.numpy as jnp

from omnimoe.model.blockwise_attention import (NO_WINDOW, Meta, blockwise_attention, blockwise_cross,
                                               index_meta, is_global)

IMPLEMENTATIONS = ("auto", "blockwise", "xla", "cudnn")


def visible(meta: Meta) -> jax.Array:
  """Boolean [B, Lq, Lk]: query i may see key j."""
  same = (meta.seg_q[:, :, None] == meta.seg_k[:, None, :]) & (meta.seg_q[:, :, None] > 0)
  back = meta.order_q[:, :, None] - meta.order_k[:, None, :]
  return same & (back >= 0) & (back < meta.window)


def _xla(q, k, v, meta: Meta):
  B, L, H, D = q.shape
  K = k.shape[2]
  # Head-major layouts ([B, K, G, L, D]) keep every matmul a plain batched matmul.
  q_BxKxGxLxD = (q * jnp.asarray(D ** -0.5, q.dtype)).reshape(B, L, K, H // K, D)
  q_BxKxGxLxD = q_BxKxGxLxD.transpose(0, 2, 3, 1, 4)
  k_BxKxLxD, v_BxKxLxD = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  s = jnp.einsum("bkgld,bksd->bkgls", q_BxKxGxLxD, k_BxKxLxD, preferred_element_type=jnp.float32)
  # Additive mask: masked scores become ~-1e30, so softmax gives exactly 0 for them in every row
  # that has a visible key (each valid query sees itself). Padding rows are zeroed at the end.
  s = s + jnp.where(visible(meta), 0.0, -1e30)[:, None, None]
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  o = jnp.einsum("bkgls,bksd->bkgld", p, v_BxKxLxD, preferred_element_type=jnp.float32)
  o = o.transpose(0, 3, 1, 2, 4).reshape(B, L, H, D)
  return jnp.where((meta.seg_q > 0)[:, :, None, None], o, 0).astype(q.dtype)


def _cudnn(q, k, v, meta: Meta, index_order: bool):
  if jax.default_backend() != "gpu":
    raise ValueError("attention 'cudnn' needs a GPU; use 'auto', 'xla' or 'blockwise'")
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention 'cudnn' needs bfloat16/float16 inputs, got {q.dtype}; "
                     "set model.dtype=bfloat16 or use attention 'xla'/'blockwise'")
  if index_order and is_global(meta.window):
    mask = (meta.seg_q[:, :, None] == meta.seg_k[:, None, :]) & (meta.seg_q[:, :, None] > 0)
  else:
    mask = visible(meta)
  out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None],
                                     is_causal=index_order and is_global(meta.window),
                                     implementation="cudnn")
  return jnp.where((meta.seg_q > 0)[:, :, None, None], out, 0).astype(q.dtype)


def resolve_implementation(implementation: str, L: int, dtype, block: int) -> str:
  """The backend `auto` picks for keys of length L, this dtype and platform."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention {implementation!r}; choose from {IMPLEMENTATIONS}")
  if implementation != "auto":
    return implementation
  if jax.default_backend() == "gpu" and jnp.dtype(dtype) == jnp.bfloat16:
    from omnimoe.model.hardware_paths import has_passed
    if has_passed("cudnn"):      # only once bench/accelerator_check.py passed it here
      return "cudnn"
  return "xla" if L <= block else "blockwise"


def attend_meta(q_BxLqxHxD: jax.Array, k_BxLkxKxD: jax.Array, v_BxLkxKxD: jax.Array, meta: Meta,
                *, implementation: str = "auto", block: int = 128,
                index_order: bool = False) -> jax.Array:
  """Attention of queries and keys with their own segment ids and orders; `index_order` says the
  orders are the array index of a self-attention (lets blockwise stop at the diagonal)."""
  H, K = q_BxLqxHxD.shape[2], k_BxLkxKxD.shape[2]
  if H % K:
    raise ValueError(f"num_heads {H} must be a multiple of num_kv_heads {K}")
  impl = resolve_implementation(implementation, k_BxLkxKxD.shape[1], q_BxLqxHxD.dtype, block)
  if implementation == "auto" and impl == "cudnn" and not index_order:
    # cuDNN would need an explicit [B, Lq, Lk] mask for orders other than the array index.
    impl = "xla" if k_BxLkxKxD.shape[1] <= block else "blockwise"
  if impl == "blockwise":
    if index_order:
      return blockwise_attention(q_BxLqxHxD, k_BxLkxKxD, v_BxLkxKxD, meta.seg_q, block,
                                 meta.window)
    return blockwise_cross(q_BxLqxHxD, k_BxLkxKxD, v_BxLkxKxD, meta, block)
  if impl == "xla":
    return _xla(q_BxLqxHxD, k_BxLkxKxD, v_BxLkxKxD, meta)
  return _cudnn(q_BxLqxHxD, k_BxLkxKxD, v_BxLkxKxD, meta, index_order)


def attend(q_BxLxHxD: jax.Array, k_BxLxKxD: jax.Array, v_BxLxKxD: jax.Array,
           segment_ids_BxL: jax.Array, *, order_BxL: jax.Array | None = None,
           implementation: str = "auto", block: int = 128,
           window: jax.Array | int = NO_WINDOW) -> jax.Array:
  """Causal segment-masked self-attention; returns [B, L, H, Dh] in q's dtype. `order_BxL`:
  the 1-D order of the positions (None = the array index); `window`: a sliding window (keys less
  than `window` positions back), NO_WINDOW for global attention."""
  seg = segment_ids_BxL.astype(jnp.int32)
  if order_BxL is None:
    meta = index_meta(seg, window)
  else:
    order = order_BxL.astype(jnp.int32)
    meta = Meta(seg, seg, order, order, window)
  return attend_meta(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, meta, implementation=implementation,
                     block=block, index_order=order_BxL is None)

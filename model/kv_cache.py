"""The KV cache of generation: prefill a prompt once, then one position per step.

The cache is a pytree laid out like the decoder's parameters (model/decoder.py):
  blocks[i]     {"k", "v"}: [B, S, K, Dh] per unrolled block (all of them, or the dense ones in
                front with `model.scan_layers`)
  moe_stack     {"k", "v"}: [M, B, S, K, Dh], the scanned MoE blocks' (only with scan_layers)
  segment_ids   int32 [B, S]: the segment of each slot, 0 = empty (or padding)
  end           int32 scalar: slots filled so far (the same for every row)
in the compute dtype (`model.dtype`). Keys and values carry the logical names
("batch", "length", "act_heads", None) (with "layers" in front when stacked): rows split over the
batch axes, kv heads over `tensor`, and the length over `context`: with a context axis > 1 each
device holds a share of the slots, and the attention over them is GSPMD's partitioned reduction
(tests/test_kv_cache.py checks the logits against the recompute on data 2 x expert 2 x context 2).

A call appends its L new positions at slots end .. end + L - 1 and their queries attend over all S
slots (with the `xla` backend when L <= model.attention_block, else `model.attention`): the query at slot i sees slot j iff j <= i and both lie in the same segment != 0 (and
i - j < window in a local layer). Slot = array index of the full sequence, so a cached decoding is
the same function as a forward pass over the whole sequence (tests/test_kv_cache.py).
Per token it holds 2 * num_layers * num_kv_heads * head_dim numbers (`bytes_per_token`).
"""
import jax
import jax.numpy as jnp

from omnimoe.model.attention import attend_meta
from omnimoe.model.blockwise_attention import Meta
from omnimoe.model.config import ModelConfig
from omnimoe.model.sharding import constrain

KV = ("batch", "length", "act_heads", None)


def _constrain_kv(kv: dict, stacked: bool) -> dict:
  names = ("layers", *KV) if stacked else KV
  return {name: constrain(a, names) for name, a in kv.items()}


def init_cache(cfg: ModelConfig, batch_size: int, length: int) -> dict:
  """An empty cache of `length` slots for `batch_size` rows."""
  shape = (batch_size, length, cfg.num_kv_heads, cfg.head_dim)
  zeros = lambda *lead: {n: jnp.zeros(lead + shape, cfg.dtype) for n in ("k", "v")}
  unrolled = cfg.num_dense_layers if cfg.scan_layers else cfg.num_layers
  cache = {"blocks": [_constrain_kv(zeros(), False) for _ in range(unrolled)],
           "segment_ids": constrain(jnp.zeros((batch_size, length), jnp.int32), KV[:2]),
           "end": jnp.zeros((), jnp.int32)}
  if cfg.scan_layers:
    cache["moe_stack"] = _constrain_kv(zeros(cfg.num_moe_layers), True)
  return cache


def bytes_per_token(cfg: ModelConfig) -> int:
  """Bytes of cache one position takes (keys and values of every layer)."""
  return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize


def append_segments(cache: dict, segment_ids_BxL: jax.Array) -> dict:
  """The cache with the new positions' segment ids written at slots end .. end + L - 1 (keys and
  values are written by each layer, `write_and_attend`); `end` still points at the first."""
  seg = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"],
                                            segment_ids_BxL.astype(jnp.int32), cache["end"], 1)
  return dict(cache, segment_ids=seg)


def advance(cache: dict, length: int) -> dict:
  """The cache after a call of `length` positions (every layer written)."""
  return dict(cache, end=cache["end"] + length)


def write_and_attend(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, kv: dict, segment_ids_BxL, cache_seg_BxS,
                     end, window, cfg: ModelConfig) -> tuple[jax.Array, dict]:
  """One layer: writes k and v at slots end .. end + L - 1 of `kv`, then attends the queries over
  every slot (`cache_seg_BxS` already holds the new positions' segments). -> (o [B, L, H, Dh], kv)."""
  B, L = segment_ids_BxL.shape
  S = cache_seg_BxS.shape[1]
  write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), end, 1)
  kv = _constrain_kv({"k": write(kv["k"], k_BxLxKxD), "v": write(kv["v"], v_BxLxKxD)}, False)
  order_q = jnp.broadcast_to(end + jnp.arange(L, dtype=jnp.int32), (B, L))
  order_k = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  meta = Meta(segment_ids_BxL.astype(jnp.int32), cache_seg_BxS, order_q, order_k, window)
  # A few queries (a decoding step) take one einsum with an explicit [B, L, S] mask: the tiled
  # backends would pad the single query to a whole tile.
  impl = "xla" if L <= cfg.attention_block else cfg.attention
  o = attend_meta(q_BxLxHxD, kv["k"], kv["v"], meta, implementation=impl,
                  block=cfg.attention_block)
  return o, kv

"""Blockwise (flash-style) causal, segment-masked GQA attention in pure JAX, with block skipping.

Queries and keys are both cut into blocks of `block` rows. Query i sees key j iff order[j] <=
order[i] and their segment ids are equal and nonzero, and, in a sliding-window (local) layer,
order[i] - order[j] < window; padding rows (segment 0) return 0. `order`
is the 1-D position of a token within its row: the array index by default (`blockwise_attention`),
or what the batch carries once a row has been reordered or cut over devices (`blockwise_cross`,
whose keys may also be a different, longer array than the queries: context parallelism).

For query block i a `lax.fori_loop` visits key blocks j: j <= i only when the order is the array
index (the causal diagonal bounds the loop, and a window its start), every key block otherwise; a
`lax.cond` skips a pair
(i, j) whose mask is all false (no query in i shares a nonzero segment with an earlier key in j), so
hidden pairs cost no matmul. Forward: online softmax (running max m, running sum l, accumulator) per
query block, an outer `lax.scan` over query blocks. Backward (custom VJP): the same pair loop
recomputes probabilities from the saved log-sum-exp; dq lives in the inner carry, dk/dv in an
[nb, B, block, K, D] float32 buffer updated in place, so memory is linear in L in both directions
(scores of one block pair at a time: [B, K, G, block, block]).
Shapes: H = K * G query heads, K key/value heads, Dh head width; accumulation is float32.

`piece_forward` / `piece_backward` expose one (queries, keys) piece of a longer attention: the
float32 output and log-sum-exp of the piece, and the piece's float32 gradients given the whole
attention's output and log-sum-exp; ring attention (model/context_parallel.py) merges them.
`blocks_computed` (a debug helper) counts the pairs the forward and backward loops visit and compute.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

NEG = -1e30  # finite "minus infinity": keeps fully masked rows free of NaN; the lse of a row with
             # no visible key
NO_WINDOW = 1 << 30  # Meta.window of global attention: every earlier key of the segment


class Meta(NamedTuple):
  """Segment ids and 1-D order of the queries ([B, Lq]) and of the keys ([B, Lk]), int32, and the
  sliding window: a query sees only keys less than `window` positions before it (an int or an
  int32 scalar, which may be traced: scanned layers each carry their own; NO_WINDOW = global)."""
  seg_q: jax.Array
  seg_k: jax.Array
  order_q: jax.Array
  order_k: jax.Array
  window: jax.Array | int = NO_WINDOW


def is_global(window) -> bool:
  """True when `window` is known at trace time to hide nothing (NO_WINDOW or more)."""
  return isinstance(window, int) and window >= NO_WINDOW


def index_meta(segment_ids_BxL: jax.Array, window: jax.Array | int = NO_WINDOW) -> Meta:
  """Self-attention in array order: the order of a token is its index in the row."""
  seg = segment_ids_BxL.astype(jnp.int32)
  order = jnp.broadcast_to(jnp.arange(seg.shape[1], dtype=jnp.int32), seg.shape)
  return Meta(seg, seg, order, order, window)


def _blocks(x, nb, block):
  """[B, L, ...] -> [nb, B, block, ...], zero-padded to nb * block rows (block axis first)."""
  pad = nb * block - x.shape[1]
  x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
  return jnp.moveaxis(x.reshape(x.shape[0], nb, block, *x.shape[2:]), 1, 0)


def _unblock(x_n, L):
  """[nb, B, block, ...] -> [B, L, ...] (drops the padding rows)."""
  x = jnp.moveaxis(x_n, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :L]


def _mask(seg_q_Bxb, ord_q_Bxb, seg_k_Bxb, ord_k_Bxb, window):
  """[B, 1, 1, bq, bk] boolean: causal by order within the window, same nonzero segment."""
  same = (seg_q_Bxb[:, :, None] == seg_k_Bxb[:, None, :]) & (seg_q_Bxb[:, :, None] > 0)
  back = ord_q_Bxb[:, :, None] - ord_k_Bxb[:, None, :]          # how far before the query
  return (same & (back >= 0) & (back < window))[:, None, None]


def _visit_row(i, q_side, k_side_n, diagonal, pair_fn, carry, window):
  """Fold pair_fn(j, mask, carry) over the key blocks j whose mask with query block i is not all
  false (when `diagonal`, only j from the first block the window reaches up to i; else every key
  block).

  carry is (count, user carry); count is int32 [visited, computed]: one per loop step, one per pair
  computed.
  """
  seg_k_n, ord_k_n = k_side_n
  block = seg_k_n.shape[-1]

  def body(j, c):
    mask = _mask(*q_side, seg_k_n[j], ord_k_n[j], window)

    def compute(c):
      return c[0].at[1].add(1), pair_fn(j, mask, c[1])
    return jax.lax.cond(jnp.any(mask), compute, lambda c: c, (c[0].at[0].add(1), c[1]))
  # A traced bound keeps this a while loop, never a scan: inside an outer scan that is being
  # differentiated (scanned layers), JAX's partial evaluation would otherwise stack every pair's
  # intermediates as residuals ([steps, pairs, ..., block, block]): quadratic memory.
  if diagonal:   # rows i*block.. see keys from i*block - window + 1 on
    lower = jnp.maximum(0, i - (jnp.asarray(window, jnp.int32) + block - 2) // block)
    return jax.lax.fori_loop(lower, i + 1, body, carry)
  return jax.lax.fori_loop(0, i * 0 + seg_k_n.shape[0], body, carry)


def _q_blocks(x_BxLxHxD, K, nb, block):
  """[B, L, H, D] -> [nb, B, K, G, block, D]."""
  B, _, H, D = x_BxLxHxD.shape
  x_n = _blocks(x_BxLxHxD, nb, block)
  return x_n.reshape(nb, B, block, K, H // K, D).transpose(0, 1, 3, 4, 2, 5)


def _q_unblock(x_n, L):
  """[nb, B, K, G, block, D] -> [B, L, H, D]."""
  nb, B, K, G, block, D = x_n.shape
  return _unblock(x_n.transpose(0, 1, 4, 2, 3, 5).reshape(nb, B, block, K * G, D), L)


def _prepare(q, k, v, meta: Meta, block):
  """Blocked operands: q [nq, B, K, G, block, D], k/v [nk, B, block, K, D], the query side
  (seg, order) [nq, B, block] each and the key side [nk, B, block] each."""
  K = k.shape[2]
  nq, nk = -(-q.shape[1] // block), -(-k.shape[1] // block)
  q_side = (_blocks(meta.seg_q, nq, block), _blocks(meta.order_q, nq, block))
  k_side = (_blocks(meta.seg_k, nk, block), _blocks(meta.order_k, nk, block))
  return nq, _q_blocks(q, K, nq, block), _blocks(k, nk, block), _blocks(v, nk, block), q_side, k_side


def _scores(q_b, k_b, scale):
  """[B, K, G, bq, D] x [B, bk, K, D] -> [B, K, G, bq, bk] float32."""
  return jnp.einsum("bkgqd,bskd->bkgqs", q_b, k_b, preferred_element_type=jnp.float32) * scale


def _forward(q, k, v, meta: Meta, block, diagonal):
  """(out float32 [nq, B, K, G, block, D], lse [nq, B, K, G, block] (NEG where no key is
  visible), pairs [visited, computed])."""
  D = q.shape[3]
  scale = D ** -0.5
  nq, q_n, k_n, v_n, q_side_n, k_side_n = _prepare(q, k, v, meta, block)
  shape = q_n.shape[1:-1]  # B, K, G, block

  def row(count, x):
    q_b, seg_q, ord_q, i = x

    def pair(j, mask, c):
      m, l, acc = c
      s = jnp.where(mask, _scores(q_b, k_n[j], scale), NEG)
      m_new = jnp.maximum(m, s.max(axis=-1))
      corr = jnp.exp(m - m_new)
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v_n.dtype), v_n[j],
                      preferred_element_type=jnp.float32)
      return m_new, l * corr + p.sum(axis=-1), acc * corr[..., None] + pv

    init = (jnp.full(shape, NEG, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (D,), jnp.float32))
    count, (m, l, acc) = _visit_row(i, (seg_q, ord_q), k_side_n, diagonal, pair, (count, init),
                                    meta.window)
    has_keys = l > 0
    out_b = acc / jnp.where(has_keys, l, 1.0)[..., None]
    lse_b = jnp.where(has_keys, m + jnp.log(jnp.where(has_keys, l, 1.0)), NEG)
    return count, (out_b, lse_b)

  count, (out_n, lse_n) = jax.lax.scan(row, jnp.zeros(2, jnp.int32),
                                       (q_n, *q_side_n, jnp.arange(nq)))
  return out_n, lse_n, count


def _backward(q, k, v, meta: Meta, out, lse_n, dout, block, diagonal):
  """(dq, dk, dv float32, pairs): the forward's pair loop, recomputing p from the saved lse
  ([nq, B, K, G, block]) of the whole attention that `out` is the output of."""
  Lq, Lk, D = q.shape[1], k.shape[1], q.shape[3]
  K = k.shape[2]
  scale = D ** -0.5
  nq, q_n, k_n, v_n, q_side_n, k_side_n = _prepare(q, k, v, meta, block)
  do_n = _q_blocks(dout, K, nq, block)
  o_n = _q_blocks(out, K, nq, block)
  delta_n = jnp.sum(do_n.astype(jnp.float32) * o_n.astype(jnp.float32), axis=-1)

  def row(carry, x):
    q_b, do_b, lse_b, delta_b, seg_q, ord_q, i = x

    def pair(j, mask, c):
      dq, dk_n, dv_n = c
      k_b, v_b = k_n[j], v_n[j]
      s = _scores(q_b, k_b, scale)
      p = jnp.where(mask, jnp.exp(jnp.where(mask, s, NEG) - lse_b[..., None]), 0.0)
      dv_b = jnp.einsum("bkgqs,bkgqd->bskd", p.astype(do_b.dtype), do_b,
                        preferred_element_type=jnp.float32)
      dp = jnp.einsum("bkgqd,bskd->bkgqs", do_b, v_b, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta_b[..., None]) * scale).astype(q_b.dtype)
      dq = dq + jnp.einsum("bkgqs,bskd->bkgqd", ds, k_b, preferred_element_type=jnp.float32)
      dk_b = jnp.einsum("bkgqs,bkgqd->bskd", ds, q_b, preferred_element_type=jnp.float32)
      return dq, dk_n.at[j].add(dk_b), dv_n.at[j].add(dv_b)

    count, dk_n, dv_n = carry
    init = (jnp.zeros(q_b.shape, jnp.float32), dk_n, dv_n)
    count, (dq_b, dk_n, dv_n) = _visit_row(i, (seg_q, ord_q), k_side_n, diagonal, pair,
                                           (count, init), meta.window)
    return (count, dk_n, dv_n), dq_b

  zeros = jnp.zeros(k_n.shape, jnp.float32)
  (count, dk_n, dv_n), dq_n = jax.lax.scan(
      row, (jnp.zeros(2, jnp.int32), zeros, zeros),
      (q_n, do_n, lse_n, delta_n, *q_side_n, jnp.arange(nq)))
  return _q_unblock(dq_n, Lq), _unblock(dk_n, Lk), _unblock(dv_n, Lk), count


def _lse_unblock(lse_n, L):
  """[nq, B, K, G, block] -> [B, L, H]."""
  return _q_unblock(lse_n[..., None], L)[..., 0]


def _lse_blocks(lse_BxLxH, K, block):
  """[B, L, H] -> [nq, B, K, G, block]."""
  nq = -(-lse_BxLxH.shape[1] // block)
  return _q_blocks(lse_BxLxH[..., None], K, nq, block)[..., 0]


def _attention(q, k, v, meta: Meta, block, diagonal):
  out_n, lse_n, _ = _forward(q, k, v, meta, block, diagonal)
  return _q_unblock(out_n, q.shape[1]).astype(q.dtype), lse_n


def _grads(block, diagonal, res, dout):
  q, k, v, meta, out, lse_n = res
  dq, dk, dv, _ = _backward(q, k, v, meta, out, lse_n, dout, block, diagonal)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _custom(q, k, v, meta: Meta, block: int, diagonal: bool):
  return _attention(q, k, v, meta, block, diagonal)[0]


def _custom_fwd(q, k, v, meta, block, diagonal):
  out, lse_n = _attention(q, k, v, meta, block, diagonal)
  return out, (q, k, v, meta, out, lse_n)


_custom.defvjp(_custom_fwd, _grads)


def blockwise_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL, block: int,
                        window: jax.Array | int = NO_WINDOW):
  """Causal segment-masked self-attention in array order, memory-linear in L (module docstring)."""
  return _custom(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, index_meta(segment_ids_BxL, window), block,
                 True)


def blockwise_cross(q_BxLqxHxD, k_BxLkxKxD, v_BxLkxKxD, meta: Meta, block: int):
  """Queries against keys (possibly another, longer array), causal by `meta`'s orders."""
  return _custom(q_BxLqxHxD, k_BxLkxKxD, v_BxLkxKxD, meta, block, False)


def piece_forward(q, k, v, meta: Meta, block: int):
  """One piece of an attention: (out float32 [B, Lq, H, D], lse float32 [B, Lq, H]); a query
  that sees no key of the piece has out 0 and lse NEG."""
  out_n, lse_n, _ = _forward(q, k, v, meta, block, False)
  return _q_unblock(out_n, q.shape[1]), _lse_unblock(lse_n, q.shape[1])


def piece_backward(q, k, v, meta: Meta, out, lse_BxLxH, dout, block: int):
  """float32 (dq, dk, dv) of one piece, given the whole attention's out and lse [B, Lq, H]."""
  lse_n = _lse_blocks(lse_BxLxH, k.shape[2], block)
  return _backward(q, k, v, meta, out, lse_n, dout, block, False)[:3]


def blocks_computed(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL, block: int,
                    window: jax.Array | int = NO_WINDOW):
  """Forward and backward int32 [visited, computed] counts of (query block, key block) pairs."""
  args = (q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, index_meta(segment_ids_BxL, window))
  out_n, lse, forward = _forward(*args, block, True)
  out = _q_unblock(out_n, q_BxLxHxD.shape[1])
  return forward, _backward(*args, out, lse, jnp.ones_like(out), block, True)[3]

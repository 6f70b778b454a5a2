"""Blockwise (flash-style) causal, segment-masked GQA attention in pure JAX, with block skipping.

Queries and keys are both cut into blocks of `block` rows. For query block i, a `lax.fori_loop`
visits key blocks j = 0..i only (the causal diagonal bounds the loop), and a `lax.cond` skips a
pair (i, j) whose mask is all false (no query in i shares a nonzero segment with an earlier key in
j), so hidden pairs cost no matmul. Forward: online softmax (running max m, running sum l,
accumulator) per query block, an outer `lax.scan` over query blocks. Backward (custom VJP): the
same pair loop recomputes probabilities from the saved log-sum-exp; dq lives in the inner carry,
dk/dv in an [nb, B, block, K, D] float32 buffer updated in place, so memory is linear in L in both
directions (scores of one block pair at a time: [B, K, G, block, block]).
Shapes: H = K * G query heads, K key/value heads, Dh head width; accumulation is float32.

Query i sees key j iff j <= i and segment_ids equal and nonzero; padding rows (segment 0) return 0.
`blocks_computed` (a debug helper) counts the pairs the forward and backward loops visit and compute.
"""
import functools

import jax
import jax.numpy as jnp

_NEG = -1e30  # finite "minus infinity": keeps fully masked rows free of NaN


def _blocks(x, nb, block):
  """[B, L, ...] -> [nb, B, block, ...], zero-padded to nb * block rows (block axis first)."""
  pad = nb * block - x.shape[1]
  x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
  return jnp.moveaxis(x.reshape(x.shape[0], nb, block, *x.shape[2:]), 1, 0)


def _unblock(x_n, L):
  """[nb, B, block, ...] -> [B, L, ...] (drops the padding rows)."""
  x = jnp.moveaxis(x_n, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :L]


def _mask(seg_q_Bxb, seg_k_Bxb, i, j, block):
  """[B, 1, 1, block, block] boolean, query block i x key block j: causal, same nonzero segment."""
  q_pos = i * block + jnp.arange(block)[:, None]
  k_pos = j * block + jnp.arange(block)[None, :]
  same = (seg_q_Bxb[:, :, None] == seg_k_Bxb[:, None, :]) & (seg_q_Bxb[:, :, None] > 0)
  return (same & (k_pos <= q_pos)[None])[:, None, None]


def _visit_row(i, seg_q_Bxb, seg_k_n, block, pair_fn, carry):
  """Fold pair_fn(j, mask, carry) over key blocks j <= i whose mask is not all false.

  carry is (count, user carry); count is int32 [visited, computed]: one per loop step, one per pair
  computed.
  """
  def body(j, c):
    mask = _mask(seg_q_Bxb, seg_k_n[j], i, j, block)

    def compute(c):
      return c[0].at[1].add(1), pair_fn(j, mask, c[1])
    return jax.lax.cond(jnp.any(mask), compute, lambda c: c, (c[0].at[0].add(1), c[1]))
  return jax.lax.fori_loop(0, i + 1, body, carry)


def _q_blocks(x_BxLxHxD, K, nb, block):
  """[B, L, H, D] -> [nb, B, K, G, block, D]."""
  B, _, H, D = x_BxLxHxD.shape
  x_n = _blocks(x_BxLxHxD, nb, block)
  return x_n.reshape(nb, B, block, K, H // K, D).transpose(0, 1, 3, 4, 2, 5)


def _q_unblock(x_n, L):
  """[nb, B, K, G, block, D] -> [B, L, H, D]."""
  nb, B, K, G, block, D = x_n.shape
  return _unblock(x_n.transpose(0, 1, 4, 2, 3, 5).reshape(nb, B, block, K * G, D), L)


def _prepare(q, k, v, seg, block):
  """Blocked operands: q [nb, B, K, G, block, D], k/v [nb, B, block, K, D], seg [nb, B, block]."""
  K = k.shape[2]
  nb = -(-q.shape[1] // block)
  return (nb, _q_blocks(q, K, nb, block), _blocks(k, nb, block), _blocks(v, nb, block),
          _blocks(seg, nb, block))


def _scores(q_b, k_b, scale):
  """[B, K, G, bq, D] x [B, bk, K, D] -> [B, K, G, bq, bk] float32."""
  return jnp.einsum("bkgqd,bskd->bkgqs", q_b, k_b, preferred_element_type=jnp.float32) * scale


def _forward(q, k, v, seg, block):
  """(out [B, L, H, D], lse [nb, B, K, G, block], pairs computed)."""
  L, D = q.shape[1], q.shape[3]
  scale = D ** -0.5
  nb, q_n, k_n, v_n, seg_n = _prepare(q, k, v, seg, block)
  shape = q_n.shape[1:-1]  # B, K, G, block

  def row(count, x):
    q_b, seg_q, i = x

    def pair(j, mask, c):
      m, l, acc = c
      s = jnp.where(mask, _scores(q_b, k_n[j], scale), _NEG)
      m_new = jnp.maximum(m, s.max(axis=-1))
      corr = jnp.exp(m - m_new)
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v_n.dtype), v_n[j],
                      preferred_element_type=jnp.float32)
      return m_new, l * corr + p.sum(axis=-1), acc * corr[..., None] + pv

    init = (jnp.full(shape, _NEG, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (D,), jnp.float32))
    count, (m, l, acc) = _visit_row(i, seg_q, seg_n, block, pair, (count, init))
    has_keys = l > 0
    out_b = acc / jnp.where(has_keys, l, 1.0)[..., None]
    lse_b = jnp.where(has_keys, m + jnp.log(jnp.where(has_keys, l, 1.0)), 0.0)
    return count, (out_b.astype(q.dtype), lse_b)

  count, (out_n, lse_n) = jax.lax.scan(row, jnp.zeros(2, jnp.int32), (q_n, seg_n, jnp.arange(nb)))
  return _q_unblock(out_n, L), lse_n, count


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def blockwise_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL, block: int):
  """Causal segment-masked attention, memory-linear in L (see module docstring)."""
  return _forward(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL, block)[0]


def _fwd(q, k, v, seg, block):
  out, lse, _ = _forward(q, k, v, seg, block)
  return out, (q, k, v, seg, out, lse)


def _backward(block, res, dout):
  """(dq, dk, dv, pairs computed): the forward's pair loop, recomputing p from the saved lse."""
  q, k, v, seg, out, lse_n = res
  L, D = q.shape[1], q.shape[3]
  K = k.shape[2]
  scale = D ** -0.5
  nb, q_n, k_n, v_n, seg_n = _prepare(q, k, v, seg, block)
  do_n = _q_blocks(dout, K, nb, block)
  o_n = _q_blocks(out, K, nb, block)
  delta_n = jnp.sum(do_n.astype(jnp.float32) * o_n.astype(jnp.float32), axis=-1)

  def row(carry, x):
    q_b, do_b, lse_b, delta_b, seg_q, i = x

    def pair(j, mask, c):
      dq, dk_n, dv_n = c
      k_b, v_b = k_n[j], v_n[j]
      s = _scores(q_b, k_b, scale)
      p = jnp.where(mask, jnp.exp(jnp.where(mask, s, _NEG) - lse_b[..., None]), 0.0)
      dv_b = jnp.einsum("bkgqs,bkgqd->bskd", p.astype(do_b.dtype), do_b,
                        preferred_element_type=jnp.float32)
      dp = jnp.einsum("bkgqd,bskd->bkgqs", do_b, v_b, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta_b[..., None]) * scale).astype(q_b.dtype)
      dq = dq + jnp.einsum("bkgqs,bskd->bkgqd", ds, k_b, preferred_element_type=jnp.float32)
      dk_b = jnp.einsum("bkgqs,bkgqd->bskd", ds, q_b, preferred_element_type=jnp.float32)
      return dq, dk_n.at[j].add(dk_b), dv_n.at[j].add(dv_b)

    count, dk_n, dv_n = carry
    init = (jnp.zeros(q_b.shape, jnp.float32), dk_n, dv_n)
    count, (dq_b, dk_n, dv_n) = _visit_row(i, seg_q, seg_n, block, pair, (count, init))
    return (count, dk_n, dv_n), dq_b

  zeros = jnp.zeros(k_n.shape, jnp.float32)
  (count, dk_n, dv_n), dq_n = jax.lax.scan(
      row, (jnp.zeros(2, jnp.int32), zeros, zeros), (q_n, do_n, lse_n, delta_n, seg_n, jnp.arange(nb)))
  return (_q_unblock(dq_n, L).astype(q.dtype), _unblock(dk_n, L).astype(k.dtype),
          _unblock(dv_n, L).astype(v.dtype), count)


def blocks_computed(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL, block: int):
  """Forward and backward int32 [visited, computed] counts of (query block, key block) pairs."""
  args = (q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL)
  out, lse, forward = _forward(*args, block)
  return forward, _backward(block, args + (out, lse), jnp.ones_like(out))[3]


def _bwd(block, res, dout):
  return _backward(block, res, dout)[:3] + (None,)


blockwise_attention.defvjp(_fwd, _bwd)

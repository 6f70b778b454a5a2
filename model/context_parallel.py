"""Attention over the `context` mesh axis: each device holds L / context positions of every row.

Everything but attention works position by position, so the length axis of activations is simply
sharded over `context` (the `length` rule of model/sharding.py) and GSPMD keeps it so. Attention
needs every earlier key of a row; `attend_over_context` runs it inside `jax.shard_map` (batch over
the batch axes, length over `context`, heads over `tensor` when it divides both head counts) with
one of two strategies (`model.context_parallel`):

  all_gather  the row's keys, values, segment ids and orders are gathered over `context` (tiled,
              in device order); the local queries attend to all of them (model/attention.py
              `attend_meta`). K/V memory per device grows with L.
  ring        the local K/V block and its segment ids and orders travel around the ring of
              `context` devices with `ppermute`, c - 1 times; each visit is one piece
              (model/blockwise_attention.py `piece_forward`), merged into the running output by
              its log-sum-exp in float32. The backward pass (custom VJP) sends each block around
              again together with its float32 dk/dv accumulator, which comes home after c steps.
              K/V memory per device grows with L / context; no device ever holds a whole row's K/V.

Causality and masks come from the positions' 1-D `order` (the batch's, when rows were reordered to
balance causal work: train/context_batch.py), or, without one, from the device index and the local
index (the row in array order). A length that `context` does not divide runs as plain attention
(GSPMD then gathers the row). Block pairs that causality or the segments hide are skipped in every
piece, so a ring step whose keys all lie in the queries' future costs only its mask checks.
"""
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from omnimoe.model.attention import attend, attend_meta
from omnimoe.model.blockwise_attention import NO_WINDOW, Meta, piece_backward, piece_forward
from omnimoe.model.sharding import fit_spec, logical_to_mesh_spec

AXIS = "context"
HEADS = ("batch", "length", "act_heads", None)


def _auto_sizes(mesh) -> dict[str, int]:
  return {n: s for n, s, t in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types)
          if t == jax.sharding.AxisType.Auto}


def context_size(L: int) -> int:
  """The `context` devices that split a row of L positions on the current mesh (1: none)."""
  mesh = jax.sharding.get_abstract_mesh()
  c = 1 if mesh.empty else _auto_sizes(mesh).get(AXIS, 1)
  return c if c > 1 and L % c == 0 else 1


def attend_over_context(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL, order_BxL=None, *,
                        strategy: str = "all_gather", implementation: str = "auto",
                        block: int = 128, window: jax.Array | int = NO_WINDOW):
  """Causal segment-masked self-attention of whole rows whose length may be split over `context`;
  the same function as model/attention.py `attend` (see the module docstring)."""
  L = q_BxLxHxD.shape[1]
  c = context_size(L)
  if c == 1:
    return attend(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL, order_BxL=order_BxL,
                  implementation=implementation, block=block, window=window)
  mesh = jax.sharding.get_abstract_mesh()
  sizes = _auto_sizes(mesh)
  spec_q = fit_spec(logical_to_mesh_spec(HEADS), q_BxLxHxD.shape, sizes)
  spec_k = fit_spec(logical_to_mesh_spec(HEADS), k_BxLxKxD.shape, sizes)
  heads = spec_q[2] if spec_q[2] == spec_k[2] else None
  rows = P(spec_q[0], AXIS)
  act = P(spec_q[0], AXIS, heads, None)
  seg = segment_ids_BxL.astype(jnp.int32)
  args = (q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, seg, jnp.asarray(window, jnp.int32))
  if order_BxL is not None:
    args += (order_BxL.astype(jnp.int32),)
  if strategy == "all_gather":
    body = functools.partial(_gather_body, implementation=implementation, block=block)
  elif strategy == "ring":
    body = functools.partial(_ring_body, c=c, block=block)
  else:
    raise ValueError(f"config key 'model.context_parallel' must be all_gather or ring; "
                     f"got '{strategy}'")
  specs = (act, act, act, rows, P()) + (rows,) * (len(args) - 5)   # window: replicated
  fn = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=act, check_vma=False)
  return fn(*args)


def _local_meta(seg_BxLc, window, order_BxLc):
  """The local block's segment ids and orders (from the device index when the batch has none)."""
  if order_BxLc is None:
    Lc = seg_BxLc.shape[1]
    start = jax.lax.axis_index(AXIS) * Lc
    order_BxLc = jnp.broadcast_to(start + jnp.arange(Lc, dtype=jnp.int32), seg_BxLc.shape)
  return Meta(seg_BxLc, seg_BxLc, order_BxLc, order_BxLc, window)


def _gather_body(q, k, v, seg, window, order=None, *, implementation, block):
  local = _local_meta(seg, window, order)
  gather = lambda a: jax.lax.all_gather(a, AXIS, axis=1, tiled=True)
  meta = local._replace(seg_k=gather(local.seg_k), order_k=gather(local.order_k))
  return attend_meta(q, gather(k), gather(v), meta, implementation=implementation, block=block)


def _ring_body(q, k, v, seg, window, order=None, *, c, block):
  return ring_attention(q, k, v, _local_meta(seg, window, order), c, min(block, q.shape[1]))


def _shift(tree, c):
  """Every device's blocks to the next device of the ring."""
  perm = [(i, (i + 1) % c) for i in range(c)]
  return jax.tree.map(lambda a: jax.lax.ppermute(a, AXIS, perm), tree)


def _traced(n: int):
  """n as a traced bound: the ring stays a while loop, never a scan whose steps an outer
  differentiated scan (scanned layers) would stack as residuals (see blockwise_attention.py)."""
  return jax.lax.axis_index(AXIS) * 0 + n


def _merge(out, lse, out_s, lse_s):
  """Two normalised partial attentions -> the attention over both key sets (float32)."""
  new = jnp.logaddexp(lse, lse_s)
  return (out * jnp.exp(lse - new)[..., None] + out_s * jnp.exp(lse_s - new)[..., None]), new


def _ring_forward(q, k, v, meta: Meta, c, block):
  """(out float32 [B, Lc, H, D], lse float32 [B, Lc, H]) over the whole ring."""
  def piece(kv):
    k_b, v_b, seg_k, order_k = kv
    return piece_forward(q, k_b, v_b, meta._replace(seg_k=seg_k, order_k=order_k), block)

  def step(_, carry):
    out, lse, kv = carry
    kv = _shift(kv, c)
    return (*_merge(out, lse, *piece(kv)), kv)

  kv = (k, v, meta.seg_k, meta.order_k)
  out, lse, _ = jax.lax.fori_loop(1, _traced(c), step, (*piece(kv), kv))
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def ring_attention(q, k, v, meta: Meta, c: int, block: int):
  """Inside shard_map over `context` (c devices): this device's queries against every device's
  keys, passed around the ring (module docstring); [B, Lc, H, D] in q's dtype."""
  return _ring_forward(q, k, v, meta, c, block)[0].astype(q.dtype)


def _ring_fwd(q, k, v, meta, c, block):
  out, lse = _ring_forward(q, k, v, meta, c, block)
  out = out.astype(q.dtype)
  return out, (q, k, v, meta, out, lse)


def _ring_bwd(c, block, res, dout):
  q, k, v, meta, out, lse = res

  def step(_, carry):
    dq, kv, dkv = carry
    k_b, v_b, seg_k, order_k = kv
    piece = meta._replace(seg_k=seg_k, order_k=order_k)
    dq_s, dk_s, dv_s = piece_backward(q, k_b, v_b, piece, out, lse, dout, block)
    dkv = (dkv[0] + dk_s, dkv[1] + dv_s)
    return dq + dq_s, _shift(kv, c), _shift(dkv, c)      # c shifts bring each dk/dv home

  zeros = jnp.zeros(k.shape, jnp.float32)
  dq, _, (dk, dv) = jax.lax.fori_loop(
      0, _traced(c), step, (jnp.zeros(q.shape, jnp.float32), (k, v, meta.seg_k, meta.order_k),
                   (zeros, zeros)))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


ring_attention.defvjp(_ring_fwd, _ring_bwd)

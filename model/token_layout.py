"""The order of flattened tokens: each device's tokens one contiguous slice of T = B * L.

The MoE layer flattens [B, L] tokens to T for routing and the experts' shard_map
(model/expert_parallel.py), which splits T over the batch axes and, under context parallelism,
`context`. B-major flattening makes each device's tokens contiguous when only the rows are split;
with the length split too, the flat order must be (batch shard, context shard, row, position).
"""
import math

import jax
from jax.sharding import PartitionSpec as P

from omnimoe.model.sharding import fit_spec

TOKEN_AXES = ("data", "fsdp", "expert")   # the mesh axes that split the rows of tokens


def token_layout(B: int, L: int) -> tuple[int, int]:
  """(batch shards, context shards) of [B, L] tokens on the current mesh, as plan_exchange splits
  them; (1, 1) without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1, 1
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  tok = fit_spec(P(TOKEN_AXES), (B,), sizes)[0]
  axes = () if tok is None else (tok,) if isinstance(tok, str) else tuple(tok)
  c = sizes.get("context", 1)
  return math.prod(sizes[a] for a in axes), c if c > 1 and L % c == 0 else 1


def flatten_tokens(a_BxL, layout: tuple[int, int]):
  """[B, L, ...] -> [T, ...] in the order whose contiguous slices are the devices' tokens: B-major
  without context parallelism; with it, (batch shard, context shard, row, position), so that the
  flat axis splits over (batch axes, context) with no data moved."""
  nb, c = layout
  B, L = a_BxL.shape[:2]
  if c == 1:
    return a_BxL.reshape(B * L, *a_BxL.shape[2:])
  a = a_BxL.reshape(nb, B // nb, c, L // c, *a_BxL.shape[2:]).swapaxes(1, 2)
  return a.reshape(B * L, *a_BxL.shape[2:])


def unflatten_tokens(a_T, B: int, L: int, layout: tuple[int, int]):
  """The inverse of flatten_tokens: [T, ...] -> [B, L, ...]."""
  nb, c = layout
  if c == 1:
    return a_T.reshape(B, L, *a_T.shape[1:])
  a = a_T.reshape(nb, c, B // nb, L // c, *a_T.shape[1:]).swapaxes(1, 2)
  return a.reshape(B, L, *a_T.shape[1:])

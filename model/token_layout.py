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


def _axes(B: int, L: int) -> tuple[tuple[str, ...], dict[str, int]]:
  """(the mesh axes splitting the flat tokens, major first; the mesh's Auto axis sizes)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return (), {}
  sizes = {n: s for n, s, t in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types)
           if t == jax.sharding.AxisType.Auto}
  tok = fit_spec(P(TOKEN_AXES), (B,), sizes)[0]
  axes = () if tok is None else (tok,) if isinstance(tok, str) else tuple(tok)
  if sizes.get("context", 1) > 1 and L % sizes["context"] == 0:
    axes += ("context",)
  return axes, sizes


def token_layout(B: int, L: int) -> tuple[int, int]:
  """(batch shards, context shards) of [B, L] tokens on the current mesh, as plan_exchange splits
  them; (1, 1) without a mesh."""
  axes, sizes = _axes(B, L)
  c = sizes["context"] if "context" in axes else 1
  return math.prod(sizes[a] for a in axes) // c, c


def constrain_tokens(a_T, B: int, L: int):
  """a_T ([T, ...], flattened by flatten_tokens) constrained to lie split as the devices hold it,
  so that GSPMD keeps per-token work (the router's top-k) local instead of gathering T."""
  axes, _ = _axes(B, L)
  if not axes:
    return a_T
  return jax.lax.with_sharding_constraint(a_T, P(axes if len(axes) > 1 else axes[0]))


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

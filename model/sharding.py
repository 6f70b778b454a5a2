"""Logical axis names and the one table that maps them to mesh axes.

Parameters say what their axes are (`embed`, `mlp`, `heads`, `kv`, `vocab`, `exp`, `layers`) in the
`out_sharding` metadata of `nnx.Param` (the name flax 0.12.8 uses; `sharding` and `sharding_names`
are deprecated aliases). They are created with `eager_sharding=False`, so building a model needs no
mesh; shardings are derived afterwards with `param_shardings`. Activations use `constrain`.

The mesh has axes ("data", "fsdp", "expert", "tensor", "context"). A mesh axis that is missing from
the mesh, already used by an earlier dimension of the same array, or that does not divide the
dimension, is dropped for that dimension (the dimension is then replicated over it).
"""
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor", "context")

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("embed", "fsdp"),              # residual width of weights (FSDP shards it)
    ("mlp", "tensor"),              # expert / MLP hidden width
    ("heads", "tensor"),            # attention heads (query and key/value)
    ("kv", None),                   # per-head width
    ("vocab", "tensor"),            # vocabulary of the embedding table and the output head
    ("exp", "expert"),              # leading expert axis of expert weights
    ("layers", None),               # stacked-layer axis (if layers are ever scanned)
    # activations
    ("batch", ("data", "fsdp", "expert")),  # batch rows (expert devices split them too, outside
                                            # the experts: attention is not repeated over `expert`)
    ("length", "context"),          # sequence positions (context parallelism: model/context_parallel.py)
    ("act_embed", None),            # residual width of activations
    ("act_heads", "tensor"),        # heads of q/k/v activations
    ("act_vocab", "tensor"),        # vocabulary axis of logits
)

Names = Sequence[str | None]


def logical_to_mesh_spec(names: Names, rules=LOGICAL_RULES) -> PartitionSpec:
  """Logical names (one per array dimension, None = replicated) -> PartitionSpec of mesh axes."""
  table = dict(rules)
  out = []
  for name in names:
    if name is None:
      out.append(None)
    elif name in table:
      out.append(table[name])
    else:
      raise KeyError(f"logical axis {name!r} has no rule in model.sharding.LOGICAL_RULES")
  return PartitionSpec(*out)


def fit_spec(spec: PartitionSpec, shape: Sequence[int],
             axis_sizes: dict[str, int]) -> PartitionSpec:
  """Drops mesh axes that are absent, reused, or do not divide their dimension."""
  used: set[str] = set()
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    kept = []
    size = 1
    for ax in axes:
      if ax in axis_sizes and ax not in used and dim % (size * axis_sizes[ax]) == 0:
        kept.append(ax)
        size *= axis_sizes[ax]
    used.update(kept)
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*out)


def _names_of(v: nnx.Variable, ndim: int) -> Names:
  names = v.get_metadata().get("out_sharding")
  return tuple(names) if names else (None,) * ndim


def param_shardings(abstract_state, mesh: jax.sharding.Mesh, rules=LOGICAL_RULES):
  """NamedSharding for every Variable of an `nnx.State` (same tree; Variables keep metadata)."""
  axis_sizes = dict(mesh.shape)

  def one(x):
    if isinstance(x, nnx.Variable):
      shape = x.get_value().shape
      spec = fit_spec(logical_to_mesh_spec(_names_of(x, len(shape)), rules), shape, axis_sizes)
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, names: Names, rules=LOGICAL_RULES) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a `jax.set_mesh` context.

  Only Auto mesh axes are used (Manual axes inside shard_map are skipped).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  auto = {n: s for n, s, t in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types)
          if t == jax.sharding.AxisType.Auto}
  if not auto:
    return x
  spec = fit_spec(logical_to_mesh_spec(names, rules), x.shape, auto)
  return jax.lax.with_sharding_constraint(x, spec)


def require_auto_axes(x: jax.Array) -> None:
  """Fails clearly on Explicit mesh axes (jax.make_mesh's default in jax 0.10): the model is
  written for GSPMD propagation and needs `axis_types=(jax.sharding.AxisType.Auto,) * 5`."""
  meshes = [jax.sharding.get_abstract_mesh(), getattr(jax.typeof(x).sharding, "mesh", None)]
  for mesh in meshes:
    if mesh is not None and not mesh.empty and mesh.explicit_axes:
      raise ValueError(
          "the model needs a mesh with AxisType.Auto axes, got Explicit axes "
          f"{mesh.explicit_axes}; "
          "build it with jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))")


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], names: Names,
          dtype) -> nnx.Param:
  """An nnx.Param initialised with `init(key, shape, dtype)` and tagged with logical axis names."""
  assert len(names) == len(shape), (names, shape)
  value = init(rngs.params(), tuple(shape), jnp.dtype(dtype))
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)

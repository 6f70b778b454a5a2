"""Renumber each MoE layer's experts in a train state: expert weights, router columns, the balance
bias and the optimizer's moments move together, so the model computes the same function.

`perms_MxE[m]` is layer m's permutation: new expert j is old expert perms_MxE[m, j]. The parameter
layout is the one model/decoder.py documents: unrolled MoE blocks `params["blocks"][i]["moe"]`
(i = num_dense_layers + m), or with `model.scan_layers` one stacked `params["moe_stack"]["moe"]`
whose leaves carry a leading [M] axis. Routed expert weights have the expert axis first (after
[M]), the router its last; shared experts and everything else stay as they are. Adam's moments
(optax `tree_map_params`) have the parameters' layout and move with them; the step count does not.

Under a dropless dispatch with no group limit the permuted state gives the same losses and
generations (the experts a token takes, and their weights, are the same, renumbered; only exact
ties between router probabilities could break differently). With `model.moe.max_groups` the groups
are consecutive experts, so the permutation decides which experts share a group, by design.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

EXPERT_FIRST = ("w_gate_ExDxH", "w_up_ExDxH", "w_down_ExHxD")
ROUTER = "router_DxE"


def _key(entry):
  return getattr(entry, "key", getattr(entry, "idx", None))


def _mover(path, num_dense: int, perms_MxE: np.ndarray):
  """The function that permutes the parameter at `path` (or leaves it)."""
  keys = [_key(e) for e in path]
  name = keys[-1]
  if len(keys) < 2 or keys[-2] != "moe" or name not in (*EXPERT_FIRST, ROUTER):
    return lambda a: a
  if keys[0] == "moe_stack":                     # [M, ...]: layer m by perms_MxE[m]
    idx = jnp.asarray(perms_MxE)
    if name == ROUTER:
      return lambda a: jnp.take_along_axis(a, jnp.broadcast_to(idx[:, None, :], a.shape), axis=2)
    return lambda a: jax.vmap(lambda w, p: w[p])(a, idx)
  perm = jnp.asarray(perms_MxE[int(keys[1]) - num_dense])
  return (lambda a: a[:, perm]) if name == ROUTER else (lambda a: a[perm])


def permute_state(state: dict, perms_MxE: np.ndarray, *, num_dense_layers: int,
                  optimizer: optax.GradientTransformation) -> dict:
  """The train state (train/state.py) with every MoE layer's experts renumbered by `perms_MxE`."""
  perms_MxE = np.asarray(perms_MxE)
  movers = jax.tree_util.tree_map_with_path(
      lambda path, _: _mover(path, num_dense_layers, perms_MxE), state["params"])
  apply = lambda leaf, move: move(leaf)
  out = dict(state)
  out["params"] = jax.tree.map(apply, state["params"], movers)
  out["opt_state"] = optax.tree_map_params(optimizer, apply, state["opt_state"], movers)
  if "ema" in state:                   # the moving average moves like the parameters
    out["ema"] = jax.tree.map(apply, state["ema"], movers)
  if "bias" in state.get("router", {}):          # [M, 3, E]
    bias = state["router"]["bias"]
    idx = jnp.broadcast_to(jnp.asarray(perms_MxE)[:, None, :], bias.shape)
    out["router"] = dict(state["router"], bias=jnp.take_along_axis(bias, idx, axis=2))
  return out


def permute_counts(counts_Mx3xExE: np.ndarray, perms_MxE: np.ndarray) -> np.ndarray:
  """Co-activation counts [M, 3, E, E] in the new numbering."""
  return np.stack([c[:, p][:, :, p] for c, p in zip(counts_Mx3xExE, perms_MxE)])


def permute_choices(choices_MxNxK: np.ndarray, perms_MxE: np.ndarray) -> np.ndarray:
  """Each token's experts [M, N, K] in the new numbering (-1 stays -1)."""
  out = []
  for c, p in zip(choices_MxNxK, perms_MxE):
    new_of_old = np.argsort(p)
    out.append(np.where(c >= 0, new_of_old[np.maximum(c, 0)], -1))
  return np.stack(out).astype(choices_MxNxK.dtype)

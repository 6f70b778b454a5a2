"""The routed experts' compute, on one device or expert-parallel inside `jax.shard_map`.

`routed_experts(x_TxD, expert_TxK, weight_TxK, used_TxK, valid_T, w_gate, w_up, w_down, cfg)`
returns (y_TxD, dropped) where y sums each token's experts' SwiGLU outputs, weighted, and
`dropped` counts the valid assignments that found no room (only `all_to_all` drops).

Modes (`model.moe.dispatch`):
  local       no mesh (or one device): sort the assignments, grouped matmuls, combine
              (model/grouped_matmul.py).
  all_gather  dropless. Inside shard_map every device holds its tokens and E/G experts (G = size of
              the `expert` axis, the experts' groups). Tokens are all-gathered over `expert`, each
              device runs its own experts on the assignments that name them, and the partial sums
              go back with one psum_scatter. Moves G x the tokens; simple; runs on CPU.
  all_to_all  one row per (token, expert device it uses), with the token's local expert ids and
              weights; fixed capacity C = ceil(capacity_factor * S * r / G) rows per (sender,
              receiver) pair (S tokens per device, r = min(k, G, max_groups) rows per token, k the
              mean experts per token). The receiver runs its experts on the first
              ceil(capacity_factor * S * k) assignments the rows carry (a compact list, so its
              buffers do not grow with k) and sums them, weighted, into the row; one all_to_all
              brings the rows back. Assignments whose row found no room, or past the receiver's
              list, are dropped (counted); padding tokens (segment 0) take no room and get 0. Rack-limited routing (max_groups, with num_groups = G) thus bounds the
              rows, and the bytes, per token.
  ragged_all_to_all  dropless, exact sizes: the rows of all_to_all (one per token and expert
              device) packed back to back, exchanged with jax.lax.ragged_all_to_all (sizes and
              offsets first traded by two small all_to_alls), run by the receiver and sent back the
              same way; the gradient is the reverse exchange (custom VJP). Buffers are sized for the
              worst case (like all_gather), the bytes moved are only what is used. XLA:CPU does not
              implement the collective, so on CPU it is refused unless the `Platform` asks for it
              emulated (the tests, `omnimoe plan --platform gpu`), which runs the same bookkeeping
              with a padded all_to_all; a test lowers it for CUDA and TPU (jax.export), but it has
              not yet run on a GPU or TPU. With no expert
              axis (G = 1) nothing is exchanged and it runs as all_gather does.
  auto        local without a mesh of several devices; on GPU or TPU (`Platform`, passed down
              from where the model is built) with an expert axis, ragged_all_to_all once it has
              passed bench/accelerator_check.py on that device kind and jax version
              (model/hardware_paths.py; `omnimoe plan --platform` assumes it has); else
              all_gather.

Inside shard_map the tokens are split over the batch axes that divide them (data, fsdp, expert),
and over `context` when it divides their length (context parallelism);
when the `expert` axis does not split them, each expert device takes a 1/G slice for the
exchange and the results are gathered back. Expert weights enter split over `expert` (experts) and
`tensor` (hidden width, then one psum over `tensor`); their other axes (fsdp) are gathered on entry
by XLA, and their gradients are summed over the replicas by shard_map's transpose. What the
per-device bodies share (G, E, the mesh axes, the config) is one `Exchange`.
"""
import dataclasses
import functools
import math
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from omnimoe.model import grouped_matmul as gmm
from omnimoe.model.fused_experts import blocked_swiglu
from omnimoe.model import ragged_exchange as rx
from omnimoe.model.sharding import fit_spec
from omnimoe.model.token_layout import TOKEN_AXES

if TYPE_CHECKING:
  from omnimoe.model.config import MoEConfig

DISPATCH_MODES = ("auto", "local", "all_gather", "all_to_all", "ragged_all_to_all")
PLATFORMS = ("cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Platform:
  """What the experts' program is built for.

  name: "cpu", "gpu" or "tpu"; None = jax.default_backend() (`omnimoe plan --platform gpu` plans
  a GPU's choices on simulated CPUs). emulate_ragged: ragged_all_to_all's collective is emulated
  by a padded all_to_all of the same semantics (model/ragged_exchange.py), so that its
  bookkeeping runs on XLA:CPU (the tests, `omnimoe plan`)."""
  name: str | None = None
  emulate_ragged: bool = False

  def __post_init__(self):
    if self.name is not None and self.name not in PLATFORMS:
      raise ValueError(f"platform must be one of {', '.join(PLATFORMS)}, got {self.name!r}")

  @property
  def kind(self) -> str:
    return self.name or jax.default_backend()


def expert_groups(mesh, num_experts: int) -> int:
  """G: the devices the experts are split over (the `expert` axis, when it divides them), else 1."""
  g = dict(zip(mesh.axis_names, mesh.axis_sizes)).get("expert", 1)
  return g if num_experts % g == 0 else 1


def resolve_dispatch(mode: str, mesh, num_experts: int, platform: Platform = Platform()) -> str:
  """The mode to run (see the module docstring for `auto`); `num_experts` (with a mesh) says
  whether the expert axis splits the experts: without that, ragged_all_to_all runs as all_gather."""
  if mode not in DISPATCH_MODES:
    raise ValueError(f"model.moe.dispatch={mode!r} must be one of {DISPATCH_MODES}")
  if mode == "ragged_all_to_all" and platform.kind == "cpu" and not platform.emulate_ragged:
    raise ValueError("model.moe.dispatch=ragged_all_to_all needs a GPU or TPU (XLA:CPU does not "
                     "implement ragged_all_to_all); use all_gather (dropless) or all_to_all")
  if mesh is None or mesh.empty or mesh.size == 1:
    return "local"
  split = expert_groups(mesh, num_experts) > 1
  if mode == "auto":
    ragged = platform.kind in ("gpu", "tpu") and split
    if ragged and platform.name is None:   # running there (not planning): only once it passed
      from omnimoe.model.hardware_paths import has_passed
      ragged = has_passed("ragged_all_to_all")
    return "ragged_all_to_all" if ragged else "all_gather"
  if mode == "ragged_all_to_all" and not split:
    return "all_gather"          # no expert axis: every device runs all experts, nothing moves
  return mode


def swiglu_experts(x_SxD, expert_SxK, valid_SxK, weight_SxK, w_gate_ExDxH, w_up_ExDxH,
                   w_down_ExHxD, *, backend: str, block_rows: int):
  """sum_k weight[s, k] * SwiGLU_{expert[s, k]}(x[s]) over the valid slots -> [S, D]."""
  plan = gmm.plan_dispatch(expert_SxK, w_gate_ExDxH.shape[0], valid_SxK=valid_SxK,
                           backend=backend, block_rows=block_rows)
  x_RxD = gmm.dispatch(plan, x_SxD)
  if isinstance(plan, gmm.BlockedDispatch) and x_RxD.shape[0] > 0:
    # One tile loop for the whole SwiGLU (model/fused_experts.py): the same rows and function.
    y_RxD = blocked_swiglu(x_RxD, w_gate_ExDxH, w_up_ExDxH, w_down_ExHxD, plan.tiles)
  else:
    gate_RxH = plan.matmul(x_RxD, w_gate_ExDxH)
    up_RxH = plan.matmul(x_RxD, w_up_ExDxH)
    y_RxD = plan.matmul(jax.nn.silu(gate_RxH) * up_RxH, w_down_ExHxD)
  return gmm.combine(plan, y_RxD, weight_SxK)


def mean_experts_per_token(cfg) -> float:
  return cfg.top_k if cfg.router == "topk" else cfg.target_active_fraction * cfg.num_experts


def rows_per_token(cfg, groups: int) -> float:
  """Mean rows a token sends (all_to_all): one per expert device it uses, at most min(k, G), and
  at most max_groups when the routing groups are the expert devices."""
  rows = min(mean_experts_per_token(cfg), groups)
  if cfg.max_groups and cfg.num_groups == groups:
    rows = min(rows, cfg.max_groups)
  return rows


def capacity(cfg, tokens: int, groups: int) -> int:
  """Rows each device may send each expert device (all_to_all): capacity_factor x the fair share
  of its tokens' rows; at most one row per token."""
  c = math.ceil(cfg.capacity_factor * tokens * rows_per_token(cfg, groups) / groups)
  return max(1, min(c, tokens))


class Tokens(NamedTuple):
  """The tokens a device holds (T of them, or S once it takes its share)."""
  x_SxD: jax.Array
  expert_SxK: jax.Array      # routed experts (global ids)
  weight_SxK: jax.Array
  used_SxK: jax.Array        # the slot is in use (the dynamic router leaves some empty)
  valid_S: jax.Array         # not padding


@dataclasses.dataclass(frozen=True)
class Exchange:
  """What the per-device bodies of one MoE layer share: the expert devices and the mesh axes."""
  groups: int                    # G: expert devices, each holding E / G experts
  num_experts: int               # E
  token_axes: tuple[str, ...]    # mesh axes the tokens are split over
  tensor_axis: str | None        # splits the experts' hidden width (one psum after them)
  cfg: "MoEConfig"               # capacity_factor, router, backend, block_rows
  emulate_ragged: bool = False   # see Platform

  @property
  def local_experts(self) -> int:
    return self.num_experts // self.groups

  @property
  def split_here(self) -> bool:
    """Tokens repeated on the expert devices: each exchanges a 1/G share of them."""
    return self.groups > 1 and "expert" not in self.token_axes

  def swiglu(self, x_SxD, expert_SxK, valid_SxK, weight_SxK, weights):
    """swiglu_experts on this device's experts (local ids) and slice of `tensor`."""
    return swiglu_experts(x_SxD, expert_SxK, valid_SxK, weight_SxK, *weights,
                          backend=self.cfg.backend, block_rows=self.cfg.block_rows)

  def finish(self, y_SxD):
    """The experts' outputs summed over the `tensor` slices of their hidden width."""
    return jax.lax.psum(y_SxD, self.tensor_axis) if self.tensor_axis else y_SxD


def plan_exchange(mesh, cfg, shape_ExDxH, batch_size: int, platform: Platform, length: int = 1):
  """(the Exchange of one layer on `mesh`, the shard_map in_specs of (Tokens, weights)).

  The B-major tokens (batch_size rows of `length`) are split over the batch axes that divide the
  rows, then over `context` when it divides the length (context parallelism shards positions)."""
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  E, _, H = shape_ExDxH
  tok = fit_spec(P(TOKEN_AXES), (batch_size,), sizes)[0]
  tok_axes = () if tok is None else (tok,) if isinstance(tok, str) else tuple(tok)
  if sizes.get("context", 1) > 1 and length % sizes["context"] == 0:
    tok_axes += ("context",)
  ep_axis = fit_spec(P("expert"), (E,), sizes)[0]          # None when G does not divide E
  tp_axis = fit_spec(P("tensor"), (H,), sizes)[0]
  ex = Exchange(expert_groups(mesh, E), E, tok_axes, tp_axis, cfg, platform.emulate_ragged)
  w_in = P(ep_axis, None, tp_axis)
  return ex, (P(tok_axes), (w_in, w_in, P(ep_axis, tp_axis, None)))


def routed_experts(x_TxD, expert_TxK, weight_TxK, used_TxK, valid_T, w_gate_ExDxH, w_up_ExDxH,
                   w_down_ExHxD, cfg, *, batch_size: int, platform: Platform = Platform()):
  """(y_TxD, dropped assignments int32) for T = batch_size * L tokens, B-major (see module doc)."""
  mesh = jax.sharding.get_abstract_mesh()
  weights = (w_gate_ExDxH, w_up_ExDxH, w_down_ExHxD)
  mode = resolve_dispatch(cfg.dispatch, mesh, w_gate_ExDxH.shape[0], platform)
  if mode == "local":
    y = swiglu_experts(x_TxD, expert_TxK, used_TxK, weight_TxK, *weights, backend=cfg.backend,
                       block_rows=cfg.block_rows)
    return y, jnp.zeros((), jnp.int32)
  ex, in_specs = plan_exchange(mesh, cfg, w_gate_ExDxH.shape, batch_size, platform,
                               length=x_TxD.shape[0] // batch_size)
  fn = jax.shard_map(functools.partial(_BODIES[mode], ex), mesh=mesh, in_specs=in_specs,
                     out_specs=(P(ex.token_axes), P()), check_vma=False)
  return fn(Tokens(x_TxD, expert_TxK, weight_TxK, used_TxK, valid_T), weights)


def _all_gather_body(ex: Exchange, tok: Tokens, weights):
  """The tokens gathered over `expert` (when it splits them); each expert device runs its experts
  on the assignments that name them; the partial sums go back with one psum_scatter (or psum)."""
  G, El = ex.groups, ex.local_experts
  gathered = G > 1 and not ex.split_here
  g = jax.lax.axis_index("expert") if G > 1 else 0
  x, e, w, u = tok.x_SxD, tok.expert_SxK, tok.weight_SxK, tok.used_SxK
  if gathered:
    x, e, w, u = (jax.lax.all_gather(a, "expert", axis=0, tiled=True) for a in (x, e, w, u))
  local_e = e - g * El
  mine = u & (local_e >= 0) & (local_e < El)
  y = ex.finish(ex.swiglu(x, jnp.clip(local_e, 0, El - 1), mine, w, weights))
  if G > 1:
    y = (jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)
         if gathered else jax.lax.psum(y, "expert"))
  return y, jnp.zeros((), jnp.int32)


def _my_share(ex: Exchange, tok: Tokens) -> tuple[Tokens, int]:
  """Each expert device exchanges a 1/G slice of the tokens it holds in common (padded rows are
  invalid: valid = 0); -> (the tokens, their count before)."""
  T0 = tok.x_SxD.shape[0]
  if not ex.split_here:
    return tok, T0
  g, part = jax.lax.axis_index("expert"), -(-T0 // ex.groups)
  pad = lambda a: jnp.pad(a, [(0, part * ex.groups - T0)] + [(0, 0)] * (a.ndim - 1))
  return Tokens(*(jax.lax.dynamic_slice_in_dim(pad(a), g * part, part) for a in tok)), T0


class Destinations(NamedTuple):
  """Where each token's slots go (`_destinations`)."""
  dest_SxK: jax.Array        # expert device of each slot
  valid_SxK: jax.Array       # in use, and the token is not padding
  same_SxKxK: jax.Array      # [s, j, j']: slot j' is valid and goes where slot j goes
  first_SxK: jax.Array       # valid, and the token's first slot for its device: it holds the row


def _destinations(ex: Exchange, tok: Tokens) -> Destinations:
  K = tok.expert_SxK.shape[1]
  valid_SxK = tok.used_SxK & tok.valid_S[:, None]
  dest_SxK = tok.expert_SxK // ex.local_experts
  same_SxKxK = (dest_SxK[:, :, None] == dest_SxK[:, None, :]) & valid_SxK[:, None, :]
  earlier_KxK = jnp.tril(jnp.ones((K, K), bool), -1)      # [j, j']: j' comes before j
  first_SxK = valid_SxK & ~jnp.any(same_SxKxK & earlier_KxK, axis=2)
  return Destinations(dest_SxK, valid_SxK, same_SxKxK, first_SxK)


class Rows(NamedTuple):
  """The rows a device sends: one per (token, expert device it uses)."""
  slot_SxK: jax.Array        # row of each first slot (out of range: none)
  assign_N: jax.Array        # the (first) assignment s*K + j each row holds; S*K = empty
  x_NxD: jax.Array
  e_NxK: jax.Array           # the token's local expert ids on the row's device (El = none)
  w_NxK: jax.Array           # and their weights (0 = none)


def _rows_to_send(ex: Exchange, tok: Tokens, d: Destinations, slot_SxK, assign_N) -> Rows:
  """The rows of a send-buffer layout (`_slots` or `_packed_slots` of d.first_SxK)."""
  S, K = tok.expert_SxK.shape
  El = ex.local_experts
  source_N = jnp.where(assign_N < S * K, assign_N // K, S)
  dest_N = jnp.take(d.dest_SxK.reshape(-1), assign_N, mode="fill", fill_value=ex.groups)
  e_NxK = jnp.take(tok.expert_SxK, source_N, axis=0, mode="fill", fill_value=0)
  mine_NxK = (jnp.take(d.valid_SxK, source_N, axis=0, mode="fill", fill_value=False)
              & (e_NxK // El == dest_N[:, None]))
  w_NxK = jnp.take(tok.weight_SxK, source_N, axis=0, mode="fill", fill_value=0)
  return Rows(slot_SxK, assign_N, gmm.move_rows(tok.x_SxD, source_N, slot_SxK),
              jnp.where(mine_NxK, e_NxK % El, El), jnp.where(mine_NxK, w_NxK, 0))


def _combine_back(ex: Exchange, back_NxD, rows: Rows, T0: int):
  """The rows come back and each token's are summed; the expert devices' shares are gathered."""
  S, K = rows.slot_SxK.shape
  y = gmm.move_rows(back_NxD, rows.slot_SxK.reshape(-1), rows.assign_N[:, None])
  y = y.reshape(S, K, -1).astype(jnp.float32).sum(1).astype(back_NxD.dtype)   # float32 sum
  return jax.lax.all_gather(y, "expert", axis=0, tiled=True)[:T0] if ex.split_here else y


def _all_to_all_body(ex: Exchange, tok: Tokens, weights):
  """Rows of fixed capacity per (sender, receiver); the receiver runs a compact list of them."""
  tok, T0 = _my_share(ex, tok)
  S, G = tok.x_SxD.shape[0], ex.groups
  C = capacity(ex.cfg, S, G)
  d = _destinations(ex, tok)
  rows = _rows_to_send(ex, tok, d, *_slots(d.dest_SxK, d.first_SxK, G, C))
  exchange = ((lambda a: jax.lax.all_to_all(a, "expert", 0, 0, tiled=True)) if G > 1
              else (lambda a: a))
  cap = math.ceil(ex.cfg.capacity_factor * S * mean_experts_per_token(ex.cfg))
  y_NxD, dropped_here = _receiver_experts(ex, exchange(rows.x_NxD), exchange(rows.e_NxK),
                                          exchange(rows.w_NxK), cap, weights)
  y = _combine_back(ex, exchange(ex.finish(y_NxD)), rows, T0)
  kept_first_SxK = d.first_SxK & (rows.slot_SxK < G * C)
  kept_SxK = jnp.any(d.same_SxKxK & kept_first_SxK[:, None, :], axis=2)   # its row went
  dropped = jnp.sum(d.valid_SxK & ~kept_SxK).astype(jnp.int32) + dropped_here
  count_axes = ex.token_axes + (("expert",) if ex.split_here else ())
  return y, jax.lax.psum(dropped, count_axes) if count_axes else dropped


def _receiver_experts(ex: Exchange, x_NxD, local_NxK, w_NxK, cap: int, weights):
  """The received rows' assignments (local expert ids, El = none), the first `cap` of them in
  row order, run as one compact list: (y_NxD weighted sums, assignments past cap)."""
  N, K = local_NxK.shape
  El = ex.local_experts
  valid_A = (local_NxK < El).reshape(N * K)
  cap = min(cap, N * K)
  slot_NxK, assign_C = _slots(jnp.zeros((N, K), jnp.int32), valid_A.reshape(N, K), 1, cap)
  row_C = jnp.where(assign_C < N * K, assign_C // K, N)
  x_CxD = gmm.move_rows(x_NxD, row_C, slot_NxK)
  e_C = jnp.take(local_NxK.reshape(-1), assign_C, mode="fill", fill_value=El)
  w_C = jnp.take(w_NxK.reshape(-1), assign_C, mode="fill", fill_value=0)
  y_CxD = ex.swiglu(x_CxD, jnp.minimum(e_C, El - 1)[:, None], (e_C < El)[:, None], w_C[:, None],
                    weights)
  y_NxD = gmm.move_rows(y_CxD, slot_NxK.reshape(-1), assign_C[:, None]).reshape(N, K, -1).sum(1)
  return y_NxD, jnp.sum(valid_A & (slot_NxK.reshape(-1) >= cap)).astype(jnp.int32)


def _ragged_body(ex: Exchange, tok: Tokens, weights):
  """Rows packed back to back (no capacity, no gaps), exchanged with exact sizes, dropless."""
  tok, T0 = _my_share(ex, tok)
  S, K = tok.expert_SxK.shape
  El, emulate = ex.local_experts, ex.emulate_ragged
  n_send, n_recv = S * min(K, ex.groups), ex.groups * S   # at most one row per token and device
  d = _destinations(ex, tok)
  slot_SxK, assign_N, sizes_G = _packed_slots(d.dest_SxK, d.first_SxK, ex.groups, n_send)
  rows = _rows_to_send(ex, tok, d, slot_SxK, assign_N)
  r = rx.ragged_layout(sizes_G)
  recv_x = rx.ragged_exchange(rows.x_NxD, r, n_recv, S, emulate)
  recv_w = rx.ragged_exchange(rows.w_NxK, r, n_recv, S, emulate)
  recv_e = rx.ragged_all_to_all(rows.e_NxK, jnp.full((n_recv, K), El, rows.e_NxK.dtype), r, S,
                              emulate)
  # Dropless: every received assignment runs (no compact list, unlike all_to_all).
  y_NxD = ex.swiglu(recv_x, jnp.minimum(recv_e, El - 1), recv_e < El, recv_w, weights)
  back_NxD = rx.ragged_exchange(ex.finish(y_NxD), r.reverse(), n_send, S, emulate)
  return _combine_back(ex, back_NxD, rows, T0), jnp.zeros((), jnp.int32)


_BODIES = {"all_gather": _all_gather_body, "all_to_all": _all_to_all_body,
           "ragged_all_to_all": _ragged_body}


def _rows_of(slot_A, n_rows: int, shape):
  """(slot_SxK, assign_N: the assignment each of the n_rows rows holds, S*K when empty)."""
  A = slot_A.shape[0]
  assign_N = jnp.full((n_rows,), A, jnp.int32).at[slot_A].set(
      jnp.arange(A, dtype=jnp.int32), mode="drop")
  return slot_A.reshape(shape), assign_N


def _slots(dest_SxK, valid_SxK, groups: int, cap: int):
  """Send-buffer layout of the all_to_all mode: groups * cap rows, group d's rows first.

  Returns (slot_SxK: row of each assignment, groups*cap when invalid or past capacity;
  assign_N: assignment held by each row, S*K when empty)."""
  dest_A, _, sorted_pos_A, counts = gmm.sort_by_group(dest_SxK, groups, valid_SxK)
  rank_A = sorted_pos_A - (jnp.cumsum(counts) - counts)[dest_A]
  keep_A = (dest_A < groups) & (rank_A < cap)
  return _rows_of(jnp.where(keep_A, dest_A * cap + rank_A, groups * cap), groups * cap,
                  dest_SxK.shape)


def _packed_slots(dest_SxK, valid_SxK, groups: int, n_rows: int):
  """Send-buffer layout of the ragged mode: the valid assignments sorted by destination, back to
  back. Returns (slot_SxK, n_rows when invalid; assign_N; sizes_G: rows per destination)."""
  dest_A, _, sorted_pos_A, counts = gmm.sort_by_group(dest_SxK, groups, valid_SxK)
  slot_A = jnp.where(dest_A < groups, sorted_pos_A, n_rows)
  return (*_rows_of(slot_A, n_rows, dest_SxK.shape), counts[:groups])

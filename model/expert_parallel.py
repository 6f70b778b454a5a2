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
              implement the collective, so on CPU it is refused, except in the tests, which run the
              same bookkeeping with the collective emulated (EMULATE_RAGGED); a test lowers it for
              CUDA and TPU (jax.export), but it has not yet run on a GPU or TPU. With no expert
              axis (G = 1) nothing is exchanged and it runs as all_gather does.
  auto        local without a mesh of several devices; on GPU or TPU with an expert axis,
              ragged_all_to_all; else all_gather.

Inside shard_map the tokens are split over the batch axes that divide them (data, fsdp, expert);
when the `expert` axis does not split them, each expert device takes a 1/G slice for the
exchange and the results are gathered back. Expert weights enter split over `expert` (experts) and
`tensor` (hidden width, then one psum over `tensor`); their other axes (fsdp) are gathered on entry
by XLA, and their gradients are summed over the replicas by shard_map's transpose.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from omnimoe.model import grouped_matmul as gmm
from omnimoe.model.sharding import fit_spec

DISPATCH_MODES = ("auto", "local", "all_gather", "all_to_all", "ragged_all_to_all")
# Tests set this to run ragged_all_to_all's bookkeeping on CPU, with the collective emulated by
# a padded all_to_all of the same semantics (`_emulated_ragged_all_to_all`).
EMULATE_RAGGED = False
# `omnimoe plan --platform gpu|tpu` sets this (with EMULATE_RAGGED) to plan an accelerator's choices.
PLATFORM: str | None = None
TOKEN_AXES = ("data", "fsdp", "expert")


def platform() -> str:
  """The backend the program is built for: jax.default_backend(), or what `omnimoe plan
  --platform` (PLATFORM) asks for when it compiles a GPU/TPU step on simulated CPUs."""
  return PLATFORM or jax.default_backend()


def expert_groups(mesh, num_experts: int) -> int:
  """G: the devices the experts are split over (the `expert` axis, when it divides them), else 1."""
  g = dict(zip(mesh.axis_names, mesh.axis_sizes)).get("expert", 1)
  return g if num_experts % g == 0 else 1


def resolve_dispatch(mode: str, mesh, num_experts: int) -> str:
  """The mode to run (see the module docstring for `auto`); `num_experts` (with a mesh) says
  whether the expert axis splits the experts: without that, ragged_all_to_all runs as all_gather."""
  if mode not in DISPATCH_MODES:
    raise ValueError(f"model.moe.dispatch={mode!r} must be one of {DISPATCH_MODES}")
  if mode == "ragged_all_to_all" and platform() == "cpu" and not EMULATE_RAGGED:
    raise ValueError("model.moe.dispatch=ragged_all_to_all needs a GPU or TPU (XLA:CPU does not "
                     "implement ragged_all_to_all); use all_gather (dropless) or all_to_all")
  if mesh is None or mesh.empty or mesh.size == 1:
    return "local"
  split = expert_groups(mesh, num_experts) > 1
  if mode == "auto":
    return "ragged_all_to_all" if platform() in ("gpu", "tpu") and split else "all_gather"
  if mode == "ragged_all_to_all" and not split:
    return "all_gather"          # no expert axis: every device runs all experts, nothing moves
  return mode


def swiglu_experts(x_SxD, expert_SxK, valid_SxK, weight_SxK, w_gate_ExDxH, w_up_ExDxH,
                   w_down_ExHxD, *, backend: str, block_rows: int):
  """sum_k weight[s, k] * SwiGLU_{expert[s, k]}(x[s]) over the valid slots -> [S, D]."""
  plan = gmm.plan_dispatch(expert_SxK, w_gate_ExDxH.shape[0], valid_SxK=valid_SxK,
                           backend=backend, block_rows=block_rows)
  x_RxD = gmm.dispatch(plan, x_SxD)
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


def routed_experts(x_TxD, expert_TxK, weight_TxK, used_TxK, valid_T, w_gate_ExDxH, w_up_ExDxH,
                   w_down_ExHxD, cfg, *, batch_size: int):
  """(y_TxD, dropped assignments int32) for T = batch_size * L tokens, B-major (see module doc)."""
  mesh = jax.sharding.get_abstract_mesh()
  mode = resolve_dispatch(cfg.dispatch, mesh, w_gate_ExDxH.shape[0])
  kw = dict(backend=cfg.backend, block_rows=cfg.block_rows)
  if mode == "local":
    y = swiglu_experts(x_TxD, expert_TxK, used_TxK, weight_TxK, w_gate_ExDxH, w_up_ExDxH,
                       w_down_ExHxD, **kw)
    return y, jnp.zeros((), jnp.int32)

  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  E, _, H = w_gate_ExDxH.shape
  tok = fit_spec(P(TOKEN_AXES), (batch_size,), sizes)[0]
  tok_axes = () if tok is None else (tok,) if isinstance(tok, str) else tuple(tok)
  ep_axis = fit_spec(P("expert"), (E,), sizes)[0]          # None when G does not divide E
  tp_axis = fit_spec(P("tensor"), (H,), sizes)[0]
  G = expert_groups(mesh, E)
  tokens_split_over_ep = "expert" in tok_axes
  w_in = P(ep_axis, None, tp_axis)
  specs = (P(tok_axes), P(tok_axes), P(tok_axes), P(tok_axes), P(tok_axes),
           w_in, w_in, P(ep_axis, tp_axis, None))
  T, K = expert_TxK.shape

  def finish(y_SxD):
    return jax.lax.psum(y_SxD, tp_axis) if tp_axis else y_SxD

  def all_gather_body(x, e, w, u, v, wg, wu, wd):
    g = jax.lax.axis_index("expert") if G > 1 else 0
    if G > 1 and tokens_split_over_ep:
      x, e, w, u = (jax.lax.all_gather(a, "expert", axis=0, tiled=True) for a in (x, e, w, u))
    local_e = e - g * (E // G)
    mine = u & (local_e >= 0) & (local_e < E // G)
    y = finish(swiglu_experts(x, jnp.clip(local_e, 0, E // G - 1), mine, w, wg, wu, wd, **kw))
    if G > 1:
      y = (jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)
           if tokens_split_over_ep else jax.lax.psum(y, "expert"))
    return y, jnp.zeros((), jnp.int32)

  split_here = G > 1 and not tokens_split_over_ep   # tokens repeated on the expert devices

  def my_share(arrays):
    """Each expert device exchanges a 1/G slice of tokens it holds in common (padded rows are
    invalid: v = 0); -> (the arrays, the token count before)."""
    T0 = arrays[0].shape[0]
    if not split_here:
      return arrays, T0
    g, part = jax.lax.axis_index("expert"), -(-T0 // G)
    pad = lambda a: jnp.pad(a, [(0, part * G - T0)] + [(0, 0)] * (a.ndim - 1))
    return [jax.lax.dynamic_slice_in_dim(pad(a), g * part, part) for a in arrays], T0

  def rows_to_send(x, e, w, u, v, layout):
    """One row per (token, expert device it uses) at its first assignment's slot, with the
    token's local expert ids (El = none) and weights for that device. `layout(dest_SxK,
    first_SxK)` places the rows -> (slot_SxK, assign_N, ...)."""
    El = E // G
    valid_SxK = u & v[:, None]
    dest_SxK = e // El
    same_SxKxK = (dest_SxK[:, :, None] == dest_SxK[:, None, :]) & valid_SxK[:, None, :]
    earlier_KxK = jnp.tril(jnp.ones((K, K), bool), -1)      # [j, j']: j' comes before j
    first_SxK = valid_SxK & ~jnp.any(same_SxKxK & earlier_KxK, axis=2)
    slot_SxK, assign_N, *extra = layout(dest_SxK, first_SxK)
    S = x.shape[0]
    source_N = jnp.where(assign_N < S * K, assign_N // K, S)
    dest_N = jnp.take(dest_SxK.reshape(-1), assign_N, mode="fill", fill_value=G)
    e_NxK = jnp.take(e, source_N, axis=0, mode="fill", fill_value=0)
    mine_NxK = (jnp.take(valid_SxK, source_N, axis=0, mode="fill", fill_value=False)
                & (e_NxK // El == dest_N[:, None]))
    send_e = jnp.where(mine_NxK, e_NxK % El, El)
    send_w = jnp.where(mine_NxK, jnp.take(w, source_N, axis=0, mode="fill", fill_value=0), 0)
    send_x = gmm.move_rows(x, source_N, slot_SxK)
    rows = dict(slot=slot_SxK, assign=assign_N, x=send_x, e=send_e, w=send_w, valid=valid_SxK,
                same=same_SxKxK, first=first_SxK)
    return rows, extra

  def combine_back(back_N, rows, S, T0):
    y = gmm.move_rows(back_N, rows["slot"].reshape(-1), rows["assign"][:, None])
    y = y.reshape(S, K, -1).sum(1)
    return jax.lax.all_gather(y, "expert", axis=0, tiled=True)[:T0] if split_here else y

  def all_to_all_body(x, e, w, u, v, wg, wu, wd):
    (x, e, w, u, v), T0 = my_share([x, e, w, u, v])
    S = x.shape[0]
    C = capacity(cfg, S, G)
    rows, _ = rows_to_send(x, e, w, u, v, lambda d, f: _slots(d, f, G, C))
    exchange = ((lambda a: jax.lax.all_to_all(a, "expert", 0, 0, tiled=True)) if G > 1
                else (lambda a: a))
    y_N, dropped_here = _receiver_experts(
        exchange(rows["x"]), exchange(rows["e"]), exchange(rows["w"]), E // G,
        math.ceil(cfg.capacity_factor * S * mean_experts_per_token(cfg)), wg, wu, wd, kw)
    y = combine_back(exchange(finish(y_N)), rows, S, T0)
    kept_first_SxK = rows["first"] & (rows["slot"] < G * C)
    kept_SxK = jnp.any(rows["same"] & kept_first_SxK[:, None, :], axis=2)   # its row went
    dropped = jnp.sum(rows["valid"] & ~kept_SxK).astype(jnp.int32) + dropped_here
    count_axes = tuple(tok_axes) + (("expert",) if split_here else ())
    return y, jax.lax.psum(dropped, count_axes) if count_axes else dropped

  def ragged_body(x, e, w, u, v, wg, wu, wd):
    (x, e, w, u, v), T0 = my_share([x, e, w, u, v])
    S = x.shape[0]
    El = E // G
    # Rows for device d back to back (no capacity, no gaps).
    n_send = S * min(K, G)
    rows, (sizes_G,) = rows_to_send(x, e, w, u, v, lambda d, f: _packed_slots(d, f, G, n_send))
    send_x, send_e, send_w = rows["x"], rows["e"], rows["w"]
    a2a = lambda a: jax.lax.all_to_all(a, "expert", 0, 0, tiled=True)
    offsets_G = jnp.cumsum(sizes_G) - sizes_G           # my rows for device d start here
    recv_G = a2a(sizes_G)                               # rows each device sends me
    landing_G = jnp.cumsum(recv_G) - recv_G             # where device s's rows land in mine
    there_G = a2a(landing_G)                            # where my rows land on device d
    n_recv = G * S                                      # at most one row per token per device
    came_from_G = a2a(offsets_G)                        # where device s's rows to me start
    out = (offsets_G, sizes_G, there_G, recv_G)
    recv_x = _ragged_exchange(send_x, *out, landing_G, came_from_G, n_recv, S)
    recv_w = _ragged_exchange(send_w, *out, landing_G, came_from_G, n_recv, S)
    recv_e = _ragged_all_to_all(send_e, jnp.full((n_recv, K), El, send_e.dtype), *out, S)
    # Dropless: every received assignment runs (no compact list, unlike all_to_all).
    y_N = swiglu_experts(recv_x, jnp.minimum(recv_e, El - 1), recv_e < El, recv_w, wg, wu, wd, **kw)
    back_N = _ragged_exchange(finish(y_N), landing_G, recv_G, came_from_G, sizes_G,
                              offsets_G, there_G, n_send, S)
    return combine_back(back_N, rows, S, T0), jnp.zeros((), jnp.int32)

  body = {"all_gather": all_gather_body, "all_to_all": all_to_all_body,
          "ragged_all_to_all": ragged_body}[mode]
  fn = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(P(tok_axes), P()),
                     check_vma=False)
  return fn(x_TxD, expert_TxK, weight_TxK, used_TxK, valid_T, w_gate_ExDxH, w_up_ExDxH,
            w_down_ExHxD)


def _ragged_all_to_all(x_NxD, out_MxD, offsets_G, sizes_G, there_G, recv_G, cap: int):
  """Rows [offsets[d], + sizes[d]) go to device d, written there at rows [there[d], + sizes[d])
  of `out` (the rest of `out` unchanged): jax.lax.ragged_all_to_all, or its emulation."""
  if not EMULATE_RAGGED:
    return jax.lax.ragged_all_to_all(x_NxD, out_MxD, offsets_G, sizes_G, there_G, recv_G,
                                     axis_name="expert")
  return _emulated_ragged_all_to_all(x_NxD, out_MxD, offsets_G, sizes_G, there_G, recv_G, cap)


def _emulated_ragged_all_to_all(x_NxD, out_MxD, offsets_G, sizes_G, there_G, recv_G, cap: int):
  """The semantics of jax.lax.ragged_all_to_all over `expert` from a padded all_to_all (`cap`
  rows at most per pair), for the tests on CPU."""
  i_C = jnp.arange(cap)
  take_GxC = jnp.where(i_C < sizes_G[:, None], offsets_G[:, None] + i_C, x_NxD.shape[0])
  blocks = jnp.take(x_NxD, take_GxC.reshape(-1), axis=0, mode="fill", fill_value=0)
  got = jax.lax.all_to_all(blocks, "expert", 0, 0, tiled=True)        # [G * cap, ...] by sender
  at_G = jax.lax.all_to_all(there_G, "expert", 0, 0, tiled=True)     # where sender s writes
  put_GxC = jnp.where(i_C < recv_G[:, None], at_G[:, None] + i_C, out_MxD.shape[0])
  return out_MxD.at[put_GxC.reshape(-1)].set(got, mode="drop")


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _ragged_exchange(x_NxD, offsets_G, sizes_G, there_G, recv_G, landing_G, back_G,
                     n_out: int, cap: int):
  """A differentiable ragged exchange into `n_out` zero rows (see `_ragged_all_to_all`).
  `landing_G` (where each sender's rows land here) and `back_G` (where they come from in the
  sender's rows) give the reverse exchange, which is the gradient."""
  out = jnp.zeros((n_out,) + x_NxD.shape[1:], x_NxD.dtype)
  return _ragged_all_to_all(x_NxD, out, offsets_G, sizes_G, there_G, recv_G, cap)


def _ragged_exchange_fwd(x_NxD, offsets_G, sizes_G, there_G, recv_G, landing_G, back_G, n_out,
                         cap):
  y = _ragged_exchange(x_NxD, offsets_G, sizes_G, there_G, recv_G, landing_G, back_G, n_out, cap)
  return y, (x_NxD.shape[0], offsets_G, sizes_G, there_G, recv_G, landing_G, back_G)


def _ragged_exchange_bwd(n_out, cap, res, dy_MxD):
  """What device s wrote into my rows [landing[s], + recv[s]) goes back to its rows
  [back[s], + recv[s])."""
  n, offsets_G, sizes_G, there_G, recv_G, landing_G, back_G = res
  out = jnp.zeros((n,) + dy_MxD.shape[1:], dy_MxD.dtype)
  dx = _ragged_all_to_all(dy_MxD, out, landing_G, recv_G, back_G, sizes_G, cap)
  zero = lambda a: np.zeros(a.shape, jax.dtypes.float0)
  return (dx, *(zero(a) for a in (offsets_G, sizes_G, there_G, recv_G, landing_G, back_G)))


_ragged_exchange.defvjp(_ragged_exchange_fwd, _ragged_exchange_bwd)


def _receiver_experts(x_NxD, local_NxK, w_NxK, num_local: int, cap: int, wg, wu, wd, kw):
  """The received rows' assignments (local expert ids, num_local = none), the first `cap` of them
  in row order, run as one compact list: (y_NxD weighted sums, assignments past cap)."""
  N, K = local_NxK.shape
  valid_A = (local_NxK < num_local).reshape(N * K)
  cap = min(cap, N * K)
  slot_NxK, assign_C = _slots(jnp.zeros((N, K), jnp.int32), valid_A.reshape(N, K), 1, cap)
  row_C = jnp.where(assign_C < N * K, assign_C // K, N)
  x_CxD = gmm.move_rows(x_NxD, row_C, slot_NxK)
  e_C = jnp.take(local_NxK.reshape(-1), assign_C, mode="fill", fill_value=num_local)
  w_C = jnp.take(w_NxK.reshape(-1), assign_C, mode="fill", fill_value=0)
  y_CxD = swiglu_experts(x_CxD, jnp.minimum(e_C, num_local - 1)[:, None],
                         (e_C < num_local)[:, None], w_C[:, None], wg, wu, wd, **kw)
  y_NxD = gmm.move_rows(y_CxD, slot_NxK.reshape(-1), assign_C[:, None]).reshape(N, K, -1).sum(1)
  return y_NxD, jnp.sum(valid_A & (slot_NxK.reshape(-1) >= cap)).astype(jnp.int32)


def _by_destination(dest_SxK, valid_SxK, groups: int):
  """The valid assignments stably sorted by destination: (dest_A, groups for invalid ones;
  sorted position of each; assignments per destination [groups + 1], the last the invalid)."""
  A = dest_SxK.size
  dest_A = jnp.where(valid_SxK.reshape(A), dest_SxK.reshape(A), groups).astype(jnp.int32)
  order_A = jnp.argsort(dest_A, stable=True)
  sorted_pos_A = jnp.zeros((A,), jnp.int32).at[order_A].set(jnp.arange(A, dtype=jnp.int32))
  return dest_A, sorted_pos_A, jnp.zeros((groups + 1,), jnp.int32).at[dest_A].add(1)


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
  dest_A, sorted_pos_A, counts = _by_destination(dest_SxK, valid_SxK, groups)
  rank_A = sorted_pos_A - (jnp.cumsum(counts) - counts)[dest_A]
  keep_A = (dest_A < groups) & (rank_A < cap)
  return _rows_of(jnp.where(keep_A, dest_A * cap + rank_A, groups * cap), groups * cap,
                  dest_SxK.shape)


def _packed_slots(dest_SxK, valid_SxK, groups: int, n_rows: int):
  """Send-buffer layout of the ragged mode: the valid assignments sorted by destination, back to
  back. Returns (slot_SxK, n_rows when invalid; assign_N; sizes_G: rows per destination)."""
  dest_A, sorted_pos_A, counts = _by_destination(dest_SxK, valid_SxK, groups)
  slot_A = jnp.where(dest_A < groups, sorted_pos_A, n_rows)
  return (*_rows_of(slot_A, n_rows, dest_SxK.shape), counts[:groups])

"""Grouped matmul: rows grouped by expert, each group times its own expert's weight matrix.

Two ways in:
  * `grouped_matmul(x_MxK, w_ExKxN, group_sizes_E, ...)`: rows of x already sorted by expert.
  * `plan_dispatch(expert_SxK, ...)` -> `Dispatch`, then `dispatch`, `Dispatch.matmul` (any number
    of times) and `combine`: the MoE layer does the bookkeeping (sort, tile table) once per layer
    and reuses it for the gate, up and down matmuls.

Source row s (a token) has K assignments a = s*K + j, each to one expert; invalid assignments
(`valid_SxK`, e.g. the dynamic router's unused slots) take no row. Row layout (every backend):
R = A = S*K rows, the valid assignments sorted by expert with the groups back to back, then one
empty row per invalid assignment. Empty rows give 0.

Backends:
  dense       oracle: every expert on every row, then select (E times the FLOPs; tests only)
  ragged_dot  jax.lax.ragged_dot (XLA:CPU computes every expert densely: slow there)
  tokamax     tokamax.ragged_dot (Pallas Mosaic kernels on GPU/TPU, its XLA path elsewhere); needs
              `pip install tokamax`
  blocked     pure JAX: a loop over tiles of `block_rows` rows (`blocked_rows` picks the size),
              each tile inside one expert's group: tile j of group e reads rows
              start_e + j*br .. + br, computes them with that expert's [K, N] matrix (indexed in
              place: no per-tile copy of the weights) and keeps only the rows of group e (the last
              tile of a group overlaps the next groups' rows, which are masked). The tile count
              is dynamic (sum over experts of ceil(group / br) <= A/br + E), so the loop costs
              O(rows + experts) whatever the number of experts.
  megablox    jax's Pallas TPU grouped matmul (jax.experimental.pallas.ops.tpu.megablox.gmm) on TPU;
              elsewhere it runs in Pallas interpret mode (slow: for the tests only)
  auto        blocked on CPU; on a TPU megablox, on a GPU tokamax (when importable) or else
              ragged_dot, each only once it has passed bench/accelerator_check.py on that device
              kind and jax version (model/hardware_paths.py); blocked until then

Gradients avoid row scatters (slow on XLA:CPU): the row moves have custom VJPs that gather through
the inverse permutation; the blocked backward runs the same tile loop, adding each tile's
x^T dy into its expert's slice of the weight gradient in place (O(tiles), no scatter over blocks).
The MoE layer's SwiGLU on the blocked backend runs all three matmuls in one tile loop
(model/fused_experts.py); `BlockedDispatch.matmul` is the single matmul.
"""
import dataclasses

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "dense", "ragged_dot", "blocked", "tokamax", "megablox")


def _tokamax():
  """The tokamax module, or None when it is not installed (or does not import with this jax)."""
  try:
    import tokamax
    from absl import flags
  except Exception:   # ImportError, or a tokamax built for another jax
    return None
  # tokamax reads its options from absl flags and, if nobody parsed them, parses sys.argv, which
  # fails on our command line (or pytest's): its options keep their defaults instead.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return tokamax


def resolve_backend(backend: str) -> str:
  if backend not in BACKENDS:
    raise ValueError(f"unknown grouped-matmul backend {backend!r}; choose from {BACKENDS}")
  if backend == "tokamax" and _tokamax() is None:
    raise ValueError("grouped-matmul backend 'tokamax' needs `pip install tokamax` "
                     "(or choose auto, blocked or ragged_dot)")
  if backend != "auto":
    return backend
  if jax.default_backend() == "cpu":
    return "blocked"
  # On an accelerator, a hardware path only once it has passed bench/accelerator_check.py here
  # (model/hardware_paths.py); until then the blocked loop, which the CPU tests cover.
  from omnimoe.model.hardware_paths import has_passed
  if jax.default_backend() == "tpu":
    return "megablox" if has_passed("megablox") else "blocked"
  if _tokamax() is not None and has_passed("tokamax"):
    return "tokamax"
  return "ragged_dot" if has_passed("ragged_dot") else "blocked"


def _megablox_matmul(x_RxK, w_ExKxN, group_sizes_E):
  """megablox.gmm with its tiles fitted to the shapes: rows padded to a whole tile, a full-width
  tile along K or N when 128 does not divide it. The rows of no group (the empty tail and the pad)
  form one more group with a zero matrix: gmm leaves rows outside every group unwritten, in the
  output and in the input gradient."""
  from jax.experimental.pallas.ops.tpu import megablox
  R, K = x_RxK.shape
  N = w_ExKxN.shape[2]
  tm = 128 if R >= 128 else max(8, -(-R // 8) * 8)
  x = jnp.pad(x_RxK, ((0, -R % tm), (0, 0)))
  sizes = group_sizes_E.astype(jnp.int32)
  sizes = jnp.concatenate([sizes, (x.shape[0] - jnp.sum(sizes))[None]])
  w = jnp.concatenate([w_ExKxN, jnp.zeros((1, K, N), w_ExKxN.dtype)])
  tiling = (tm, 128 if K % 128 == 0 else K, 128 if N % 128 == 0 else N)
  y = megablox.gmm(x, w, sizes, preferred_element_type=x.dtype, tiling=tiling,
                   interpret=jax.default_backend() != "tpu")
  return y[:R]


def _take_rows(x_SxD, idx_R):
  return jnp.take(x_SxD, idx_R, axis=0, mode="fill", fill_value=0)


@jax.custom_vjp
def move_rows(x_SxD, idx_R, inverse_SxG):
  """out[r] = x[idx[r]] (0 where idx is out of range).

  inverse_SxG lists, for every source row, the (up to G) output rows that read it (out of range =
  none), so the VJP is a gather, not a scatter."""
  return _take_rows(x_SxD, idx_R)


def _move_rows_fwd(x_SxD, idx_R, inverse_SxG):
  return _take_rows(x_SxD, idx_R), (idx_R, inverse_SxG)


def _move_rows_bwd(res, dout_RxD):
  idx_R, inverse_SxG = res
  S, G = inverse_SxG.shape
  dx = _take_rows(dout_RxD, inverse_SxG.reshape(S * G)).reshape(S, G, -1).sum(axis=1)
  return dx, None, None


move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)


def _tile(tiles: "Tiles", t, num_rows: int):
  """Tile t of the table: (expert, first row read, mask [br, 1] of the rows it computes).

  The tile reads rows s .. s + br, s = its nominal start clamped so the read stays inside the
  buffer; it computes the rows from its nominal start to the end of its expert's group."""
  s_nom = tiles.start_N[t]
  s = jnp.minimum(s_nom, num_rows - tiles.block_rows)
  rows = s + jnp.arange(tiles.block_rows, dtype=jnp.int32)
  return tiles.expert_N[t], s, ((rows >= s_nom) & (rows < tiles.stop_N[t]))[:, None]


def _expert(w_ExKxN, e):
  return jax.lax.dynamic_index_in_dim(w_ExKxN, e, keepdims=False)


def _zeros(shape, dtype, tie: jax.Array) -> jax.Array:
  """Zeros as the start of a loop carry, computed from one element of `tie` (always exactly 0).

  Plain `jnp.zeros` of equal shapes are merged by XLA's CSE across the gate/up/down matmuls, and
  every loop that then updates the shared buffer in place starts with a full copy of it (measured:
  5-7% of the layer at 256 experts). An operand that differs per call keeps them apart."""
  bits = jax.lax.bitcast_convert_type(tie.reshape(-1)[0].astype(jnp.float32), jnp.uint32)
  zero = jax.lax.shift_right_logical(jax.lax.shift_right_logical(bits, jnp.uint32(31)),
                                     jnp.uint32(1))                       # 0 whatever the bits
  return jnp.broadcast_to(zero.astype(dtype), shape)


def _update_rows(buf_RxD, s, mask_Bx1, new_BxD):
  """buf[s:s+B] = new where mask, else unchanged (an in-place update of the loop carry)."""
  old_BxD = jax.lax.dynamic_slice_in_dim(buf_RxD, s, new_BxD.shape[0])
  return jax.lax.dynamic_update_slice_in_dim(buf_RxD, jnp.where(mask_Bx1, new_BxD, old_BxD), s, 0)


@jax.custom_vjp
def _blocked_matmul(x_RxK, w_ExKxN, tiles: "Tiles"):
  """y[r] = x[r] @ w[expert of r] for the rows covered by the tiles in use, 0 elsewhere.

  Mixed precision: w stays in its own dtype (the float32 masters) and each tile's expert matrix is
  cast to x's dtype where it is used; the backward adds every tile's x^T dy into a weight gradient
  kept in w's dtype, with float32 products, so a bfloat16 run does not accumulate its weight
  gradients in bfloat16."""
  R, br = x_RxK.shape[0], tiles.block_rows

  def body(t, y_RxN):
    e, s, m = _tile(tiles, t, R)
    y_BxN = jax.lax.dynamic_slice_in_dim(x_RxK, s, br) @ _expert(w_ExKxN, e).astype(x_RxK.dtype)
    return _update_rows(y_RxN, s, m, y_BxN)

  y0 = _zeros((R, w_ExKxN.shape[2]), x_RxK.dtype, w_ExKxN)
  return jax.lax.fori_loop(0, tiles.used, body, y0)


def _blocked_matmul_fwd(x_RxK, w_ExKxN, tiles):
  return _blocked_matmul(x_RxK, w_ExKxN, tiles), (x_RxK, w_ExKxN, tiles)


def _blocked_matmul_bwd(res, dy_RxN):
  x_RxK, w_ExKxN, tiles = res
  R, br = x_RxK.shape[0], tiles.block_rows

  def body(t, carry):
    dx_RxK, dw_ExKxN = carry
    e, s, m = _tile(tiles, t, R)
    w_KxN = _expert(w_ExKxN, e).astype(dy_RxN.dtype)
    # Rows outside the tile's group are zeroed in both factors: they add nothing to dw[e]
    # (and a non-finite value in another group's row cannot leak in as 0 * inf).
    x_BxK = jnp.where(m, jax.lax.dynamic_slice_in_dim(x_RxK, s, br), 0)
    dy_BxN = jnp.where(m, jax.lax.dynamic_slice_in_dim(dy_RxN, s, br), 0)
    dx_BxK = jax.lax.dot_general(dy_BxN, w_KxN, (((1,), (1,)), ((), ())))
    dw_KxN = jax.lax.dot_general(x_BxK, dy_BxN, (((0,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
    dw_ExKxN = jax.lax.dynamic_update_index_in_dim(
        dw_ExKxN, _expert(dw_ExKxN, e) + dw_KxN.astype(dw_ExKxN.dtype), e, 0)
    return _update_rows(dx_RxK, s, m, dx_BxK), dw_ExKxN

  zeros = (_zeros(x_RxK.shape, x_RxK.dtype, dy_RxN),
           _zeros(w_ExKxN.shape, w_ExKxN.dtype, w_ExKxN))
  dx, dw = jax.lax.fori_loop(0, tiles.used, body, zeros)
  return dx, dw, None


_blocked_matmul.defvjp(_blocked_matmul_fwd, _blocked_matmul_bwd)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Dispatch:
  """Where every assignment lives in the row layout (see module docstring), for the backends that
  take the groups' sizes (dense, ragged_dot, tokamax, megablox); `BlockedDispatch` adds its tiles."""
  backend: str = dataclasses.field(metadata=dict(static=True))  # any of BACKENDS but auto
  num_experts: int = dataclasses.field(metadata=dict(static=True))
  group_sizes_E: jax.Array     # int32: valid assignments per expert
  slot_SxK: jax.Array          # int32: layout row of each assignment; R for invalid ones
  assign_R: jax.Array          # int32: assignment held by each layout row; A for empty rows
  expert_R: jax.Array          # int32: expert of each layout row; E for empty rows

  @property
  def num_rows(self) -> int:
    return self.assign_R.shape[0]

  def matmul(self, x_RxK: jax.Array, w_ExKxN: jax.Array) -> jax.Array:
    """Each layout row times its expert's matrix; empty rows give 0. Output in x's dtype."""
    w = w_ExKxN.astype(x_RxK.dtype)
    if self.backend == "ragged_dot":
      y = jax.lax.ragged_dot(x_RxK, w, self.group_sizes_E)
    elif self.backend == "tokamax":
      y = _tokamax().ragged_dot(x_RxK, w, self.group_sizes_E)
    elif self.backend == "megablox":
      y = _megablox_matmul(x_RxK, w, self.group_sizes_E)
    else:  # dense oracle: every expert on every row, one expert at a time (memory R x N)
      def one_expert(y_RxN, e):
        return jnp.where((self.expert_R == e)[:, None], x_RxK @ w[e], y_RxN), None
      y, _ = jax.lax.scan(one_expert, jnp.zeros((x_RxK.shape[0], w.shape[2]), x_RxK.dtype),
                          jnp.arange(self.num_experts))
    return jnp.where((self.expert_R < self.num_experts)[:, None], y, 0).astype(x_RxK.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tiles:
  """The blocked backend's tile table, sized for the worst case: tile t computes rows
  start_N[t] .. min(+ block_rows, stop_N[t]) with expert expert_N[t]; the first `used` are in use."""
  block_rows: int = dataclasses.field(metadata=dict(static=True))
  expert_N: jax.Array          # int32: expert of each tile (nondecreasing)
  start_N: jax.Array           # int32: first row of each tile
  stop_N: jax.Array            # int32: end of the tile's expert's group
  used: jax.Array              # int32 scalar: tiles in use (a prefix of the table)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockedDispatch(Dispatch):
  """The row layout of the blocked backend, with its tile table."""
  tiles: Tiles

  def matmul(self, x_RxK: jax.Array, w_ExKxN: jax.Array) -> jax.Array:
    if x_RxK.shape[0] == 0:
      return jnp.zeros((0, w_ExKxN.shape[2]), x_RxK.dtype)
    return _blocked_matmul(x_RxK, w_ExKxN, self.tiles)   # casts w per tile (float32 dw)


PAD_FRACTION = 4    # tiles shrink until the expected padding E * br / 2 is at most A / (2 * 4)
MIN_TILE_ROWS = 32  # smaller tiles cost more per row than their padding saves (measured on CPU)


def blocked_rows(num_assignments: int, num_experts: int, block_rows: int) -> int:
  """Rows per tile: `block_rows`, halved while the expected padding of the last tile of every
  group (half a tile per expert) exceeds A / 8, down to 32 rows; at most A."""
  br = block_rows
  while br > MIN_TILE_ROWS and num_experts * br > num_assignments // PAD_FRACTION:
    br //= 2
  return max(1, min(br, num_assignments))


def _tile_table(group_sizes_E: jax.Array, br: int, num_rows: int) -> Tiles:
  """Tiles of br rows over groups laid out back to back from row 0; group e gets
  ceil(size_e / br) tiles. The table is static, sized for the worst case."""
  E = group_sizes_E.shape[0]
  size_E = group_sizes_E.astype(jnp.int32)
  nt = max(1, (num_rows + E * (br - 1)) // br)    # >= sum_e ceil(size_e / br)
  tiles_E = -(-size_E // br)
  tiles_end_E = jnp.cumsum(tiles_E)
  end_E = jnp.cumsum(size_E)
  t_N = jnp.arange(nt, dtype=jnp.int32)
  expert_N = jnp.minimum(jnp.searchsorted(tiles_end_E, t_N, side="right"), E - 1).astype(jnp.int32)
  j_N = t_N - (tiles_end_E - tiles_E)[expert_N]   # tile index inside its group
  start_N = (end_E - size_E)[expert_N] + j_N * br
  return Tiles(br, expert_N, start_N.astype(jnp.int32), end_E[expert_N].astype(jnp.int32),
               tiles_end_E[-1])


def sort_by_group(group_SxK: jax.Array, num_groups: int, valid_SxK: jax.Array | None = None):
  """The A = S*K assignments stably sorted by group, the invalid ones last. Returns (group_A:
  num_groups for invalid ones; order_A: the assignment at each sorted position; sorted_pos_A: the
  sorted position of each assignment; counts: assignments per group [num_groups + 1], the last
  counting the invalid ones)."""
  A = group_SxK.size
  group_A = group_SxK.reshape(A).astype(jnp.int32)
  if valid_SxK is not None:
    group_A = jnp.where(valid_SxK.reshape(A), group_A, num_groups)
  order_A = jnp.argsort(group_A, stable=True)
  sorted_pos_A = jnp.zeros((A,), jnp.int32).at[order_A].set(jnp.arange(A, dtype=jnp.int32))
  counts = jnp.zeros((num_groups + 1,), jnp.int32).at[group_A].add(1)
  return group_A, order_A, sorted_pos_A, counts


def plan_dispatch(expert_SxK: jax.Array, num_experts: int, *, valid_SxK: jax.Array | None = None,
                  backend: str = "auto", block_rows: int = 64) -> Dispatch:
  """Bookkeeping for S source rows with K assignments each (invalid ones take no row):
  a `BlockedDispatch` for the blocked backend, else a `Dispatch`."""
  backend = resolve_backend(backend)
  S, K = expert_SxK.shape
  A, E = S * K, num_experts
  expert_A, order_A, sorted_pos_A, counts = sort_by_group(expert_SxK, E, valid_SxK)
  valid_A = expert_A < E
  slot_SxK = jnp.where(valid_A, sorted_pos_A, A).reshape(S, K)
  assign_R = jnp.where(valid_A[order_A], order_A, A).astype(jnp.int32)
  expert_R = jnp.take(expert_A, assign_R, mode="fill", fill_value=E)
  rows = (E, counts[:E], slot_SxK, assign_R, expert_R)
  if backend != "blocked":
    return Dispatch(backend, *rows)
  tiles = _tile_table(counts[:E], blocked_rows(A, E, block_rows), A)
  return BlockedDispatch(backend, *rows, tiles)


def dispatch(plan: Dispatch, x_SxD: jax.Array) -> jax.Array:
  """Source rows -> layout rows [R, D] (empty rows are 0)."""
  K = plan.slot_SxK.shape[1]
  source_R = jnp.where(plan.assign_R < plan.slot_SxK.size, plan.assign_R // K, x_SxD.shape[0])
  return move_rows(x_SxD, source_R, plan.slot_SxK)


def gather_assignments(plan: Dispatch, y_RxD: jax.Array) -> jax.Array:
  """Layout rows -> one row per assignment [S*K, D] (invalid assignments are 0)."""
  return move_rows(y_RxD, plan.slot_SxK.reshape(-1), plan.assign_R[:, None])


def combine(plan: Dispatch, y_RxD: jax.Array, weights_SxK: jax.Array) -> jax.Array:
  """Weighted sum of each source row's K expert outputs: [S, D], summed in float32 (y's dtype out)."""
  S, K = weights_SxK.shape
  y_SxKxD = gather_assignments(plan, y_RxD).reshape(S, K, -1)
  return jnp.einsum("skd,sk->sd", y_SxKxD.astype(jnp.float32),
                    weights_SxK.astype(jnp.float32)).astype(y_RxD.dtype)


def grouped_matmul(x_MxK: jax.Array, w_ExKxN: jax.Array, group_sizes_E: jax.Array, *,
                   backend: str = "auto", block_rows: int = 64) -> jax.Array:
  """Rows of x sorted by expert (group e = the next group_sizes_E[e] rows; sum <= M) -> [M, N].

  Rows past sum(group_sizes_E) give 0.
  """
  M = x_MxK.shape[0]
  E = w_ExKxN.shape[0]
  ends_E = jnp.cumsum(group_sizes_E.astype(jnp.int32))
  expert_Mx1 = jnp.searchsorted(ends_E, jnp.arange(M), side="right").astype(jnp.int32)[:, None]
  plan = plan_dispatch(expert_Mx1, E, valid_SxK=expert_Mx1 < E, backend=backend,
                       block_rows=block_rows)
  return plan.matmul(x_MxK, w_ExKxN)       # already in the layout's order: no row moves needed

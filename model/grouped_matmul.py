"""Grouped matmul: rows grouped by expert, each group times its own expert's weight matrix.

Two ways in:
  * `grouped_matmul(x_MxK, w_ExKxN, group_sizes_E, ...)`: rows of x already sorted by expert.
  * `plan_dispatch(expert_SxK, ...)` -> `Dispatch`, then `dispatch`, `Dispatch.matmul` (any number
    of times) and `combine`: the MoE layer does the bookkeeping (sort, padding, block experts) once
    per layer and reuses it for the gate, up and down matmuls.

Source row s (a token) has K assignments a = s*K + j, each to one expert; invalid assignments
(`valid_SxK`, e.g. the dynamic router's unused slots) take no row. Row layouts (R rows):
  dense, ragged_dot  R = A = S*K: assignments sorted by expert, groups back to back.
  blocked            R = nb * br >= A + E*(br-1) (worst case), br = `blocked_rows(A, E, block_rows)`:
                     each expert's group starts on a block boundary and is padded to whole
                     blocks, so every block has one expert; the used blocks are a prefix
                     (`used_blocks`), the rest is empty. Empty rows are zeros.

Backends:
  dense       oracle: every expert on every row, then select (E times the FLOPs; tests only)
  ragged_dot  jax.lax.ragged_dot (XLA:CPU computes every expert densely: slow there)
  blocked     pure JAX: a loop over chunks of blocks, each one batched matmul
              einsum('bik,bkn->bin', x_blocks, w[block_expert]); the trip count is dynamic, so the
              empty tail of the static buffer costs nothing
  auto        blocked on CPU; ragged_dot on GPU/TPU (tokamax later)

Gradients avoid row scatters (slow on XLA:CPU): the row moves have custom VJPs that gather through
the inverse permutation; the blocked weight gradient adds each block's product (a whole [K, N]
slice) to its expert, O(blocks) rather than O(blocks * experts).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "dense", "ragged_dot", "blocked")


def resolve_backend(backend: str) -> str:
  if backend not in BACKENDS:
    raise ValueError(f"unknown grouped-matmul backend {backend!r}; choose from {BACKENDS}")
  if backend != "auto":
    return backend
  return "blocked" if jax.default_backend() == "cpu" else "ragged_dot"


def _take_rows(x_SxD, idx_R):
  return jnp.take(x_SxD, idx_R, axis=0, mode="fill", fill_value=0)


@jax.custom_vjp
def _move_rows(x_SxD, idx_R, inverse_SxG):
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


_move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)


def _block_chunks(used_blocks, chunk: int):
  """Loop trip count: chunks of `chunk` blocks that hold any assignment (a dynamic count)."""
  return (used_blocks + chunk - 1) // chunk


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked_matmul(x_NxBxK, w_ExKxN, block_expert_N, used_blocks, chunk):
  """y[b] = x[b] @ w[block_expert[b]] for the first `used_blocks` blocks, 0 after them.

  A loop over chunks of `chunk` blocks with a dynamic trip count: the empty blocks at the end of
  the static buffer (its worst-case padding) cost nothing."""
  nb, br, _ = x_NxBxK.shape

  def body(i, y_NxBxN):
    start = i * chunk
    x_CxBxK = jax.lax.dynamic_slice_in_dim(x_NxBxK, start, chunk)
    e_C = jax.lax.dynamic_slice_in_dim(block_expert_N, start, chunk)
    y_CxBxN = jnp.einsum("bik,bkn->bin", x_CxBxK, jnp.take(w_ExKxN, e_C, axis=0))
    return jax.lax.dynamic_update_slice_in_dim(y_NxBxN, y_CxBxN, start, 0)

  y0 = jnp.zeros((nb, br, w_ExKxN.shape[2]), x_NxBxK.dtype)
  return jax.lax.fori_loop(0, _block_chunks(used_blocks, chunk), body, y0)


def _blocked_matmul_fwd(x_NxBxK, w_ExKxN, block_expert_N, used_blocks, chunk):
  y = _blocked_matmul(x_NxBxK, w_ExKxN, block_expert_N, used_blocks, chunk)
  return y, (x_NxBxK, w_ExKxN, block_expert_N, used_blocks)


def _blocked_matmul_bwd(chunk, res, dy_NxBxN):
  x_NxBxK, w_ExKxN, block_expert_N, used_blocks = res

  def body(i, carry):
    dx_NxBxK, dw_ExKxN = carry
    start = i * chunk
    x_CxBxK = jax.lax.dynamic_slice_in_dim(x_NxBxK, start, chunk)
    dy_CxBxN = jax.lax.dynamic_slice_in_dim(dy_NxBxN, start, chunk)
    e_C = jax.lax.dynamic_slice_in_dim(block_expert_N, start, chunk)
    dx_CxBxK = jnp.einsum("bin,bkn->bik", dy_CxBxN, jnp.take(w_ExKxN, e_C, axis=0))
    # Accumulated in place, O(blocks) and not O(blocks * experts) (blocks are sorted by expert).
    dw_ExKxN = dw_ExKxN.at[e_C].add(jnp.einsum("bik,bin->bkn", x_CxBxK, dy_CxBxN),
                                    indices_are_sorted=True)
    return jax.lax.dynamic_update_slice_in_dim(dx_NxBxK, dx_CxBxK, start, 0), dw_ExKxN

  zeros = (jnp.zeros_like(x_NxBxK), jnp.zeros(w_ExKxN.shape, dy_NxBxN.dtype))
  dx, dw = jax.lax.fori_loop(0, _block_chunks(used_blocks, chunk), body, zeros)
  return dx, dw.astype(w_ExKxN.dtype), None, None


_blocked_matmul.defvjp(_blocked_matmul_fwd, _blocked_matmul_bwd)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Dispatch:
  """Where every assignment lives in the row layout of one backend (see module docstring)."""
  backend: str = dataclasses.field(metadata=dict(static=True))     # dense|ragged_dot|blocked
  block_rows: int = dataclasses.field(metadata=dict(static=True))  # rows per block used
  num_experts: int = dataclasses.field(metadata=dict(static=True))
  group_sizes_E: jax.Array     # int32: valid assignments per expert
  slot_SxK: jax.Array          # int32: layout row of each assignment; R for invalid ones
  assign_R: jax.Array          # int32: assignment held by each layout row; A for empty rows
  expert_R: jax.Array          # int32: expert of each layout row; E for empty rows
  block_expert_N: jax.Array | None  # int32: expert of each block (blocked layout only)
  used_blocks: jax.Array | None     # int32 scalar: blocks holding any assignment (a prefix)
  chunk_blocks: int = dataclasses.field(default=1, metadata=dict(static=True))  # blocks per
                                    # iteration of the blocked matmul loop; divides the block count

  @property
  def num_rows(self) -> int:
    return self.assign_R.shape[0]

  def matmul(self, x_RxK: jax.Array, w_ExKxN: jax.Array) -> jax.Array:
    """Each layout row times its expert's matrix; empty rows give 0. Output in x's dtype."""
    w = w_ExKxN.astype(x_RxK.dtype)
    if self.backend == "blocked":
      x_NxBxK = x_RxK.reshape(-1, self.block_rows, x_RxK.shape[-1])
      y_NxBxN = _blocked_matmul(x_NxBxK, w, self.block_expert_N, self.used_blocks,
                                self.chunk_blocks)
      return y_NxBxN.reshape(x_RxK.shape[0], -1)
    if self.backend == "ragged_dot":
      y = jax.lax.ragged_dot(x_RxK, w, self.group_sizes_E)
    else:  # dense oracle: every expert on every row, one expert at a time (memory R x N)
      def one_expert(y_RxN, e):
        return jnp.where((self.expert_R == e)[:, None], x_RxK @ w[e], y_RxN), None
      y, _ = jax.lax.scan(one_expert, jnp.zeros((x_RxK.shape[0], w.shape[2]), x_RxK.dtype),
                          jnp.arange(self.num_experts))
    return jnp.where((self.expert_R < self.num_experts)[:, None], y, 0).astype(x_RxK.dtype)


CHUNK_ROWS = 4096   # rows per iteration of the blocked matmul loop
PAD_FRACTION = 4    # blocks shrink until the expected padding E * br / 2 is at most A / (2 * 4)


def blocked_rows(num_assignments: int, num_experts: int, block_rows: int) -> int:
  """Rows per block: `block_rows`, halved while the expected padding (half a block per expert)
  exceeds A / 8, down to 32 rows (smaller blocks make slow matmuls on CPU); small batches (eval,
  decode) get at most A // E rows so the static buffer stays within 2 A rows."""
  br = block_rows
  while br > 32 and num_experts * br > num_assignments // PAD_FRACTION:
    br //= 2
  return max(1, min(br, num_assignments // num_experts))


def plan_dispatch(expert_SxK: jax.Array, num_experts: int, *, valid_SxK: jax.Array | None = None,
                  backend: str = "auto", block_rows: int = 64) -> Dispatch:
  """Bookkeeping for S source rows with K assignments each (invalid ones take no row)."""
  backend = resolve_backend(backend)
  S, K = expert_SxK.shape
  A, E = S * K, num_experts
  expert_A = expert_SxK.reshape(A).astype(jnp.int32)
  if valid_SxK is not None:
    expert_A = jnp.where(valid_SxK.reshape(A), expert_A, E)   # invalid ones sort last
  order_A = jnp.argsort(expert_A, stable=True)                # sorted position -> assignment
  sorted_pos_A = jnp.zeros((A,), jnp.int32).at[order_A].set(jnp.arange(A, dtype=jnp.int32))
  group_sizes_E = jnp.zeros((E + 1,), jnp.int32).at[expert_A].add(1)[:E]
  valid_A = expert_A < E

  if backend == "blocked":
    br = blocked_rows(A, E, block_rows)
    nb = -(-(A + E * (br - 1)) // br)                  # worst case
    cb = max(1, min(CHUNK_ROWS // br, nb))
    nb = -(-nb // cb) * cb                             # a whole number of chunks
    R = nb * br
    e_A = jnp.minimum(expert_A, E - 1)
    start_E = jnp.cumsum(group_sizes_E) - group_sizes_E
    padded_end_E = jnp.cumsum(-(-group_sizes_E // br) * br)
    padded_start_E = padded_end_E - (-(-group_sizes_E // br) * br)
    slot_A = jnp.where(valid_A, sorted_pos_A - start_E[e_A] + padded_start_E[e_A], R)
    assign_R = jnp.full((R,), A, jnp.int32).at[slot_A].set(
        jnp.arange(A, dtype=jnp.int32), mode="drop")
    block_expert_N = jnp.minimum(
        jnp.searchsorted(padded_end_E, jnp.arange(nb) * br, side="right"), E - 1)
    block_expert_N = block_expert_N.astype(jnp.int32)
    used_blocks = padded_end_E[-1] // br
  else:
    R, br = A, block_rows
    slot_A = jnp.where(valid_A, sorted_pos_A, R)
    assign_R = jnp.where(valid_A[order_A], order_A, A).astype(jnp.int32)
    block_expert_N = used_blocks = None
    cb = 1
  expert_R = jnp.take(expert_A, assign_R, mode="fill", fill_value=E)
  return Dispatch(backend, br, E, group_sizes_E, slot_A.reshape(S, K).astype(jnp.int32),
                  assign_R, expert_R, block_expert_N, used_blocks, cb)


def dispatch(plan: Dispatch, x_SxD: jax.Array) -> jax.Array:
  """Source rows -> layout rows [R, D] (empty rows are 0)."""
  K = plan.slot_SxK.shape[1]
  source_R = jnp.where(plan.assign_R < plan.slot_SxK.size, plan.assign_R // K, x_SxD.shape[0])
  return _move_rows(x_SxD, source_R, plan.slot_SxK)


def gather_assignments(plan: Dispatch, y_RxD: jax.Array) -> jax.Array:
  """Layout rows -> one row per assignment [S*K, D] (invalid assignments are 0)."""
  return _move_rows(y_RxD, plan.slot_SxK.reshape(-1), plan.assign_R[:, None])


def combine(plan: Dispatch, y_RxD: jax.Array, weights_SxK: jax.Array) -> jax.Array:
  """Weighted sum of each source row's K expert outputs: [S, D]."""
  S, K = weights_SxK.shape
  y_SxKxD = gather_assignments(plan, y_RxD).reshape(S, K, -1)
  return jnp.einsum("skd,sk->sd", y_SxKxD, weights_SxK.astype(y_RxD.dtype))


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
  if plan.backend == "blocked":
    return gather_assignments(plan, plan.matmul(dispatch(plan, x_MxK), w_ExKxN))
  return plan.matmul(x_MxK, w_ExKxN)       # already in sorted layout: no row moves needed

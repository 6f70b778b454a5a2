"""Every grouped-matmul backend equals the dense oracle (and the oracle equals a plain loop)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimoe.model import grouped_matmul as gmm

M, K, N, E = 40, 8, 12, 4
GROUP_CASES = [
    [10, 0, 25, 5],      # uneven, one empty expert, sum == M
    [0, 0, 0, 30],       # all on the last expert, 10 trailing rows outside every group
    [40, 0, 0, 0],       # all on the first expert
    [3, 1, 0, 7],        # small groups, most rows outside every group
    [0, 0, 0, 0],        # nothing
]


def _inputs():
  kx, kw, kr = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(kx, (M, K)), jax.random.normal(kw, (E, K, N)),
          jax.random.normal(kr, (M, N)))


def _loop_reference(x, w, group_sizes):
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  y = np.zeros((M, N))
  start = 0
  for e, n in enumerate(group_sizes):
    y[start:start + n] = x[start:start + n] @ w[e]
    start += n
  return y


def _value_and_grads(backend, block_rows):
  def loss(x, w, r, group_sizes):
    y = gmm.grouped_matmul(x, w, group_sizes, backend=backend, block_rows=block_rows)
    return jnp.sum(y * r), y
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def test_dense_oracle_matches_loop():
  x, w, r = _inputs()
  f = _value_and_grads("dense", 8)
  for gs in GROUP_CASES:
    (_, y), _ = f(x, w, r, jnp.asarray(gs, jnp.int32))
    np.testing.assert_allclose(y, _loop_reference(x, w, gs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,block_rows", [
    ("ragged_dot", 8), ("tokamax", 8), ("megablox", 8), ("blocked", 1), ("blocked", 4), ("blocked", 16), ("blocked", 64)])
def test_backend_matches_dense_forward_and_grads(backend, block_rows):
  x, w, r = _inputs()
  oracle = _value_and_grads("dense", block_rows)
  f = _value_and_grads(backend, block_rows)
  for gs in GROUP_CASES:
    gs = jnp.asarray(gs, jnp.int32)
    (_, y0), (dx0, dw0) = oracle(x, w, r, gs)
    (_, y1), (dx1, dw1) = f(x, w, r, gs)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx1, dx0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw1, dw0, rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(y1)[int(gs.sum()):]), "rows outside every group must be 0"


def test_blocked_layout_bookkeeping():
  """Rows sorted by expert (R = A); the tile table covers every valid row exactly once, each tile
  inside one expert's group, experts in order; the tile count is sum_e ceil(group_e / br)."""
  expert_SxK = jnp.asarray([[2, 0], [2, 3], [0, 2], [2, 2], [3, 0]] * 2, jnp.int32)
  valid_SxK = jnp.ones(expert_SxK.shape, bool).at[1, 1].set(False)   # one invalid slot
  plan = gmm.plan_dispatch(expert_SxK, E, valid_SxK=valid_SxK, backend="blocked", block_rows=4)
  A, br = expert_SxK.size, plan.tiles.block_rows
  assert br == 4 and plan.num_rows == A
  sizes = np.asarray(plan.group_sizes_E)
  np.testing.assert_array_equal(sizes, [6, 0, 10, 3])
  # A small batch gets tiles of at most A rows.
  assert gmm.plan_dispatch(expert_SxK[:2], E, backend="blocked", block_rows=64).tiles.block_rows == 4
  slots = np.asarray(plan.slot_SxK).reshape(-1)
  valid = np.asarray(valid_SxK).reshape(-1)
  assert sorted(slots[valid].tolist()) == list(range(sizes.sum()))
  assert np.all(slots[~valid] == A)
  expert_R = np.asarray(plan.expert_R)
  for a, e in enumerate(np.asarray(expert_SxK).reshape(-1)):
    if valid[a]:
      assert expert_R[slots[a]] == e
  used = int(plan.tiles.used)
  assert used == sum(-(-n // br) for n in sizes)
  tile_expert = np.asarray(plan.tiles.expert_N)[:used]
  start, stop = np.asarray(plan.tiles.start_N)[:used], np.asarray(plan.tiles.stop_N)[:used]
  assert np.all(np.diff(tile_expert) >= 0)
  covered = np.zeros(A, int)
  for e, s0, s1 in zip(tile_expert, start, stop):
    rows = np.arange(s0, min(s0 + br, s1))
    assert len(rows) and np.all(expert_R[rows] == e)
    covered[rows] += 1
  np.testing.assert_array_equal(covered, expert_R < E)


def _plan_value_and_grads(backend, block_rows, E_):
  """Loss through dispatch -> gate/up/down matmuls -> combine (the MoE layer's path)."""
  def loss(x, w1, w2, weight, expert, valid, r):
    plan = gmm.plan_dispatch(expert, E_, valid_SxK=valid, backend=backend, block_rows=block_rows)
    h = jax.nn.silu(plan.matmul(gmm.dispatch(plan, x), w1))
    y = gmm.combine(plan, plan.matmul(h, w2), weight)
    return jnp.sum(y * r), y
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


def _routing_cases(T, Kc, E_):
  """(name, expert [T, Kc], valid [T, Kc]) routings that stress the tile loop."""
  rng = np.random.default_rng(0)
  every = np.ones((T, Kc), bool)
  skewed = np.minimum(rng.geometric(0.3, (T, Kc)) - 1, E_ - 1)
  return [
      ("uniform", rng.integers(0, E_, (T, Kc)), every),
      ("skewed, most experts empty", skewed, every),
      ("all to the last expert", np.full((T, Kc), E_ - 1), every),
      ("all to the first expert", np.zeros((T, Kc), int), every),
      ("dynamic router, invalid slots", rng.integers(0, E_, (T, Kc)), rng.random((T, Kc)) < 0.6),
      ("no valid slot", rng.integers(0, E_, (T, Kc)), np.zeros((T, Kc), bool)),
  ]


@pytest.mark.parametrize("E_,block_rows", [(4, 4), (4, 64), (64, 8), (64, 32), (256, 32)])
def test_blocked_plan_matches_dense_forward_and_grads(E_, block_rows):
  """Many experts with few rows (tiles larger than most groups, so tiles overlap the next groups'
  rows and the last ones are clamped to the buffer's end), empty experts, everything on one
  expert, invalid slots: forward and every gradient equal the dense oracle's."""
  T, Kc, D, H = 37, 3, 8, 12
  ks = jax.random.split(jax.random.key(2), 5)
  x = jax.random.normal(ks[0], (T, D))
  w1 = jax.random.normal(ks[1], (E_, D, H))
  w2 = jax.random.normal(ks[2], (E_, H, D))
  weight = jax.nn.softmax(jax.random.normal(ks[3], (T, Kc)), axis=-1)
  r = jax.random.normal(ks[4], (T, D))
  oracle = _plan_value_and_grads("dense", block_rows, E_)
  blocked = _plan_value_and_grads("blocked", block_rows, E_)
  for name, expert, valid in _routing_cases(T, Kc, E_):
    args = (x, w1, w2, weight, jnp.asarray(expert, jnp.int32), jnp.asarray(valid), r)
    (_, y0), g0 = oracle(*args)
    (_, y1), g1 = blocked(*args)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5, err_msg=name)
    for a, b, what in zip(g1, g0, ("dx", "dw1", "dw2", "dweight")):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"{name}: {what}")


def test_blocked_rows_choice():
  """Tiles shrink toward 32 rows as experts share fewer assignments; never more than A rows."""
  assert gmm.blocked_rows(32768, 8, 256) == 256
  assert gmm.blocked_rows(32768, 64, 256) == 128
  assert gmm.blocked_rows(32768, 256, 256) == 32
  assert gmm.blocked_rows(32768, 4096, 256) == 32
  assert gmm.blocked_rows(10, 4, 64) == 10
  assert gmm.blocked_rows(1, 4, 64) == 1


def test_blocked_ignores_nonfinite_rows_of_other_groups():
  """A tile reads past its group's end; a non-finite value there must not leak into its result."""
  x = jnp.asarray(np.arange(12, dtype=np.float32).reshape(6, 2))
  x = x.at[3].set(jnp.inf)                              # row 3 is expert 1's
  w = jnp.ones((2, 2, 3))
  gs = jnp.asarray([3, 1], jnp.int32)                   # rows 4, 5 outside every group
  def loss(x, w):
    y = gmm.grouped_matmul(x, w, gs, backend="blocked", block_rows=4)
    return jnp.sum(y[:3]), y
  (_, y), (dx, dw) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w)
  np.testing.assert_allclose(y[:3], np.asarray(x[:3]) @ np.ones((2, 3)))
  np.testing.assert_array_equal(dx[:3], 3.0)
  np.testing.assert_allclose(dw[0], np.broadcast_to(np.asarray(x[:3]).sum(0)[:, None], (2, 3)))


def test_loop_start_zeros_are_zero_whatever_the_tie():
  for v in (np.nan, -np.inf, -0.0, -1.5, 3e38):
    for dtype in (jnp.float32, jnp.bfloat16):
      z = jax.jit(lambda t: gmm._zeros((3, 2), dtype, t))(jnp.full((2, 2), v, jnp.float32))
      assert z.dtype == dtype and np.all(np.asarray(z, np.float32) == 0)
      assert not np.any(np.signbit(np.asarray(z, np.float32)))


def test_plan_is_reused_for_several_matmuls():
  """dispatch -> matmul -> matmul -> combine equals the per-token two-layer product."""
  kx, kw1, kw2 = jax.random.split(jax.random.key(1), 3)
  T, Kc = 9, 2
  x = jax.random.normal(kx, (T, K))
  w1, w2 = jax.random.normal(kw1, (E, K, N)), jax.random.normal(kw2, (E, N, K))
  expert_TxK = jnp.asarray([[0, 1], [1, 2], [3, 0], [3, 2], [0, 3], [1, 0], [2, 3], [3, 1],
                            [0, 2]], jnp.int32)
  weight_TxK = jax.nn.softmax(jax.random.normal(kw1, (T, Kc)), axis=-1)
  want = sum(weight_TxK[:, j:j + 1] * jnp.einsum("tk,tkn,tnm->tm", x, w1[expert_TxK[:, j]],
                                                 w2[expert_TxK[:, j]]) for j in range(Kc))
  for backend in ("dense", "ragged_dot", "tokamax", "megablox", "blocked"):
    plan = gmm.plan_dispatch(expert_TxK, E, backend=backend, block_rows=4)
    got = gmm.combine(plan, plan.matmul(plan.matmul(gmm.dispatch(plan, x), w1), w2), weight_TxK)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=backend)


def test_unknown_backend_is_refused():
  with pytest.raises(ValueError, match="unknown grouped-matmul backend"):
    gmm.resolve_backend("tokamax-typo")
  assert gmm.resolve_backend("auto") == "blocked"   # tests run on CPU


def test_tokamax_backend_needs_tokamax(monkeypatch):
  # CI installs tokamax (the test extra), so its backend runs above through its XLA path on CPU;
  # without it the backend is refused in one line.
  assert gmm.resolve_backend("tokamax") == "tokamax"
  monkeypatch.setattr(gmm, "_tokamax", lambda: None)
  with pytest.raises(ValueError, match="needs `pip install tokamax`"):
    gmm.resolve_backend("tokamax")

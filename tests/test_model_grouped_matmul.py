"""Every grouped-matmul backend equals the dense oracle (and the oracle equals a plain loop)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import grouped_matmul as gmm

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
    ("ragged_dot", 8), ("blocked", 1), ("blocked", 4), ("blocked", 16), ("blocked", 64)])
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
  """Each block holds one expert; groups start on block boundaries; the buffer is static."""
  expert_SxK = jnp.asarray([[2, 0], [2, 3], [0, 2], [2, 2], [3, 0]] * 2, jnp.int32)
  plan = gmm.plan_dispatch(expert_SxK, E, backend="blocked", block_rows=4)
  A, br = expert_SxK.size, plan.block_rows
  assert br == 4
  assert plan.num_rows == -(-(A + E * (br - 1)) // br) * br
  np.testing.assert_array_equal(plan.group_sizes_E, [6, 0, 10, 4])
  # A small batch gets smaller blocks (padding stays bounded by the number of assignments).
  assert gmm.plan_dispatch(expert_SxK[:4], E, backend="blocked", block_rows=64).block_rows == 2
  slots = np.asarray(plan.slot_SxK).reshape(-1)
  assert len(set(slots.tolist())) == A
  block_expert = np.asarray(plan.block_expert_N)
  for a, e in enumerate(np.asarray(expert_SxK).reshape(-1)):
    assert block_expert[slots[a] // br] == e
  assert np.all(np.diff(block_expert) >= 0)


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
  for backend in ("dense", "ragged_dot", "blocked"):
    plan = gmm.plan_dispatch(expert_TxK, E, backend=backend, block_rows=4)
    got = gmm.combine(plan, plan.matmul(plan.matmul(gmm.dispatch(plan, x), w1), w2), weight_TxK)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=backend)


def test_unknown_backend_is_refused():
  with pytest.raises(ValueError, match="unknown grouped-matmul backend"):
    gmm.resolve_backend("tokamax-typo")
  assert gmm.resolve_backend("auto") == "blocked"   # tests run on CPU

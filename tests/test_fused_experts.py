"""The fused SwiGLU tile loop (model/fused_experts.py) against a per-expert loop over every row:
values and every gradient, leaf by leaf, with groups that straddle tiles and empty experts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimoe.model import grouped_matmul as gmm
from omnimoe.model.fused_experts import blocked_swiglu


def loop_reference(x_RxD, wg, wu, wd, expert_R):
  """Row r through expert expert_R[r]'s SwiGLU, one expert at a time over all rows (E = none)."""
  y = jnp.zeros_like(x_RxD)
  for e in range(wg.shape[0]):
    y_e = (jax.nn.silu(x_RxD @ wg[e]) * (x_RxD @ wu[e])) @ wd[e]
    y = jnp.where((expert_R == e)[:, None], y_e, y)
  return y


@pytest.mark.parametrize("block_rows", [4, 16, 64])
def test_fused_tile_loop_equals_a_loop_over_experts_with_every_gradient(block_rows):
  rng = np.random.default_rng(0)
  S, K, E, D, H = 96, 2, 6, 8, 12
  expert = rng.integers(0, E - 1, (S, K)).astype(np.int32)    # expert E-1 stays empty
  valid = rng.random((S, K)) < 0.9                             # some slots take no row
  plan = gmm.plan_dispatch(jnp.asarray(expert), E, valid_SxK=jnp.asarray(valid),
                           backend="blocked", block_rows=block_rows)
  x = jnp.asarray(rng.standard_normal((S * K, D)).astype(np.float32))
  ws = [jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.5)
        for s in ((E, D, H), (E, D, H), (E, H, D))]
  r = jnp.asarray(rng.standard_normal((S * K, D)).astype(np.float32))
  fused = lambda x, *w: jnp.sum(blocked_swiglu(x, *w, plan.tiles) * r)
  ref = lambda x, *w: jnp.sum(loop_reference(x, *w, plan.expert_R) * r)
  y = blocked_swiglu(x, *ws, plan.tiles)
  np.testing.assert_allclose(y, loop_reference(x, *ws, plan.expert_R), rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(y[np.asarray(plan.expert_R) == E]).max(initial=0.0)) == 0.0  # empty rows
  got = jax.grad(fused, argnums=(0, 1, 2, 3))(x, *ws)
  want = jax.grad(ref, argnums=(0, 1, 2, 3))(x, *ws)
  for name, g, w in zip(("x", "w_gate", "w_up", "w_down"), got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()), err_msg=name)
  assert float(jnp.abs(got[1][E - 1]).max()) == 0.0            # the empty expert gets nothing


def test_a_non_finite_row_of_another_group_does_not_leak_into_a_gradient():
  rng = np.random.default_rng(1)
  E, D, H = 2, 4, 6
  expert = np.array([[0]] * 5 + [[1]] * 3, np.int32)            # tiles of 4 straddle the groups
  plan = gmm.plan_dispatch(jnp.asarray(expert), E, backend="blocked", block_rows=4)
  x = rng.standard_normal((8, D)).astype(np.float32)
  ws = [jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in ((E, D, H), (E, D, H),
                                                                          (E, H, D))]
  dy = np.ones((8, D), np.float32)
  dy[np.asarray(plan.expert_R) == 1] = np.inf                   # expert 1's rows only
  _, vjp = jax.vjp(lambda *w: blocked_swiglu(jnp.asarray(x), *w, plan.tiles), *ws)
  grads = vjp(jnp.asarray(dy))
  assert all(bool(jnp.isfinite(g[0]).all()) for g in grads)     # expert 0's gradients

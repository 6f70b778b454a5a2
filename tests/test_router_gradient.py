"""The language-model loss trains the router, also for a token that takes one expert.

Oracle: central finite differences of the MoE layer's output loss, entry by entry of the router
matrix, at points where no perturbation changes which experts a token takes (checked)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnimoe.model.config import MoEConfig
from omnimoe.model.moe import MoE

B, L, D, E, H = 2, 16, 8, 4, 12
EPS = 1e-3


def _layer(cfg):
  model = MoE(D, cfg, rngs=nnx.Rngs(0))
  model.router_DxE[...] = 3.0 * model.router_DxE[...]     # confident and unconfident tokens
  is_router = lambda path, _: path[-1] == "router_DxE"
  graphdef, router_state, rest = nnx.split(model, is_router, ...)
  kx, kr = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (B, L, D))
  r = jax.random.normal(kr, (B, L, D))
  seg = jnp.ones((B, L), jnp.int32)

  @jax.jit
  def lm_loss(router_DxE):
    """The output's loss only: the balance and z losses (aux) are left out on purpose."""
    layer = nnx.merge(graphdef, jax.tree.map(lambda _: router_DxE, router_state), rest)
    y, _ = layer(x, seg, threshold=jnp.float32(0.75))
    _, _, expert_TxK, _, used_TxK = layer.route(x.reshape(-1, D), jnp.float32(0.75), None)
    used_TxK = jnp.ones(expert_TxK.shape, bool) if used_TxK is None else used_TxK
    return jnp.sum(y * r), (jnp.where(used_TxK, expert_TxK, -1), used_TxK)

  return lm_loss, jax.tree.leaves(router_state)[0]


def _finite_differences(lm_loss, w):
  _, (route0, _) = lm_loss(w)
  fd = np.zeros(w.shape, np.float64)
  for i in range(w.shape[0]):
    for j in range(w.shape[1]):
      up, (route_up, _) = lm_loss(w.at[i, j].add(EPS))
      down, (route_down, _) = lm_loss(w.at[i, j].add(-EPS))
      assert np.array_equal(route_up, route0) and np.array_equal(route_down, route0), \
          "a perturbation changed the routing: the finite difference would not be a derivative"
      fd[i, j] = (float(up) - float(down)) / (2 * EPS)
  return fd


CASES = {
    "top1": MoEConfig(num_experts=E, top_k=1, expert_hidden=H),
    "top2": MoEConfig(num_experts=E, top_k=2, expert_hidden=H),
    "dynamic": MoEConfig(num_experts=E, expert_hidden=H, router="dynamic", k_min=1, k_max=3,
                         target_active_fraction=0.5),
}


@pytest.mark.parametrize("case", CASES)
def test_router_gradient_matches_finite_differences(case):
  lm_loss, w = _layer(CASES[case])
  grad = np.asarray(jax.grad(lambda w: lm_loss(w)[0])(w), np.float64)
  fd = _finite_differences(lm_loss, w)
  _, (_, used_TxK) = lm_loss(w)
  taken_T = np.asarray(used_TxK).sum(-1)
  if case == "dynamic":    # both kinds of token are present, so both weightings are tested
    assert 0.2 < np.mean(taken_T == 1) < 0.8, np.bincount(taken_T)
  assert np.abs(grad).max() > 1e-2                     # the loss does reach the router
  print(case, "max |grad|", np.abs(grad).max(), "max |grad - fd|", np.abs(grad - fd).max(),
        "experts taken per token", np.bincount(taken_T))
  np.testing.assert_allclose(grad, fd, rtol=1e-2, atol=2e-3 * np.abs(fd).max())


@pytest.mark.parametrize("case", ["top1", "dynamic"])
def test_weight_one_for_a_lone_expert_cuts_the_router_off(case):
  """What `lone_expert=one` (renormalised weights) does: at top_k 1 the loss gives the router no
  gradient at all; with the dynamic router it gives one only through the tokens with 2+ experts."""
  lm_loss, w = _layer(dataclasses.replace(CASES[case], lone_expert="one"))
  grad = np.asarray(jax.grad(lambda w: lm_loss(w)[0])(w))
  fd = _finite_differences(lm_loss, w)
  if case == "top1":
    # 0 up to rounding (d(p/p)/dp in float32), against > 1e-2 with the probability weight
    assert np.abs(grad).max() < 1e-5 and np.abs(fd).max() < 1e-3, (grad, fd)
  else:
    np.testing.assert_allclose(grad, fd, rtol=1e-2, atol=2e-3 * np.abs(fd).max())
    lm_prob, _ = _layer(CASES[case])
    assert not np.allclose(grad, np.asarray(jax.grad(lambda w: lm_prob(w)[0])(w)))

"""MoE layer == slow reference (loop over experts, every expert on every token), router losses."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnimoe.model.config import MoEConfig
from omnimoe.model.moe import MoE
from omnimoe.model.router import balance_stats, top_k_routing

B, L, D, E, H, TOP_K = 2, 12, 16, 4, 24, 2


def _reference(params, x_BxLxD):
  """Every expert on every token, combined with the renormalised top-k router weights."""
  x = x_BxLxD.reshape(-1, D)
  probs = jax.nn.softmax(x @ params["router_DxE"], axis=-1)
  top_p, top_e = jax.lax.top_k(probs, TOP_K)
  weights = top_p / top_p.sum(-1, keepdims=True)
  y = jnp.zeros_like(x)
  for e in range(E):
    y_e = (jax.nn.silu(x @ params["w_gate_ExDxH"][e]) * (x @ params["w_up_ExDxH"][e])) @ \
        params["w_down_ExHxD"][e]
    w_e = jnp.sum(jnp.where(top_e == e, weights, 0.0), axis=-1)
    y = y + w_e[:, None] * y_e
  return y.reshape(x_BxLxD.shape)


def _setup():
  kx, kr = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (B, L, D))
  r = jax.random.normal(kr, (B, L, D))
  seg = np.ones((B, L), np.int32)
  seg[0, 7:] = 2
  seg[1, 9:] = 0                       # padding tokens are routed and computed like others
  return x, r, jnp.asarray(seg)


@pytest.mark.parametrize("backend,block_rows", [
    ("dense", 8), ("ragged_dot", 8), ("blocked", 4), ("blocked", 8), ("blocked", 64)])
def test_moe_matches_slow_reference(backend, block_rows):
  cfg = MoEConfig(num_experts=E, top_k=TOP_K, expert_hidden=H, backend=backend,
                  block_rows=block_rows)
  graphdef, state = nnx.split(MoE(D, cfg, rngs=nnx.Rngs(3)))
  x, r, seg = _setup()

  def loss(state, x):
    y, _ = nnx.merge(graphdef, state)(x, seg)
    return jnp.sum(y * r), y

  def ref_loss(state, x):
    y = _reference({k: v[...] for k, v in state.items()}, x)
    return jnp.sum(y * r), y

  (_, y), (g_state, g_x) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(state, x)
  (_, y0), (g_state0, g_x0) = jax.jit(jax.value_and_grad(ref_loss, (0, 1), has_aux=True))(state, x)
  np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_x, g_x0, rtol=1e-5, atol=1e-5)
  for name in ("router_DxE", "w_gate_ExDxH", "w_up_ExDxH", "w_down_ExHxD"):
    np.testing.assert_allclose(g_state[name][...], g_state0[name][...], rtol=1e-5, atol=1e-5,
                               err_msg=name)
  assert float(jnp.abs(g_state["router_DxE"][...]).max()) > 0, "router must get gradients"


THRESHOLD, K_MIN, K_MAX = 0.7, 1, 3


def _dynamic_reference(params, x_BxLxD):
  """Every expert on every token; per token, experts picked in numpy (descending probability
  until the mass reaches THRESHOLD, within K_MIN..K_MAX), weights renormalised over them, except
  a token with one expert, weighted by that expert's probability (model.moe.lone_expert)."""
  x = x_BxLxD.reshape(-1, D)
  probs = jax.nn.softmax(x @ params["router_DxE"], axis=-1)
  p = np.asarray(jax.lax.stop_gradient(probs))
  mask = np.zeros_like(p)
  for t in range(len(p)):
    order, mass = np.argsort(-p[t], kind="stable"), 0.0
    for j, e in enumerate(order[:K_MAX]):
      if j >= K_MIN and mass >= THRESHOLD:
        break
      mask[t, e], mass = 1.0, mass + p[t, e]
  weights = probs * mask / jnp.sum(probs * mask, axis=-1, keepdims=True)
  lone = mask.sum(-1, keepdims=True) == 1
  assert 0 < lone.mean() < 1, "both kinds of token, or the test does not test both weightings"
  weights = jnp.where(lone, probs * mask, weights)
  y = jnp.zeros_like(x)
  for e in range(E):
    y_e = (jax.nn.silu(x @ params["w_gate_ExDxH"][e]) * (x @ params["w_up_ExDxH"][e])) @ \
        params["w_down_ExHxD"][e]
    y = y + weights[:, e:e + 1] * y_e
  return y.reshape(x_BxLxD.shape), mask


@pytest.mark.parametrize("backend,block_rows", [
    ("dense", 8), ("ragged_dot", 8), ("blocked", 4), ("blocked", 64)])
def test_dynamic_moe_matches_slow_reference(backend, block_rows):
  cfg = MoEConfig(num_experts=E, expert_hidden=H, backend=backend, block_rows=block_rows,
                  router="dynamic", k_min=K_MIN, k_max=K_MAX)
  graphdef, state = nnx.split(MoE(D, cfg, rngs=nnx.Rngs(3)))
  x, r, seg = _setup()
  _, mask = _dynamic_reference({k: v[...] for k, v in state.items()}, x)
  k_T = mask.sum(-1)
  assert k_T.min() == K_MIN and k_T.max() > K_MIN, "tokens must differ in k (the test can fail)"

  def loss(state, x):
    y, aux = nnx.merge(graphdef, state)(x, seg, threshold=jnp.float32(THRESHOLD))
    return jnp.sum(y * r), (y, aux)

  def ref_loss(state, x):
    y, _ = _dynamic_reference({k: v[...] for k, v in state.items()}, x)
    return jnp.sum(y * r), y

  (_, (y, aux)), (g_state, g_x) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(state, x)
  (_, y0), (g_state0, g_x0) = jax.value_and_grad(ref_loss, (0, 1), has_aux=True)(state, x)
  np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_x, g_x0, rtol=1e-5, atol=1e-5)
  for name in ("router_DxE", "w_gate_ExDxH", "w_up_ExDxH", "w_down_ExHxD"):
    np.testing.assert_allclose(g_state[name][...], g_state0[name][...], rtol=1e-5, atol=1e-5,
                               err_msg=name)
  valid = np.asarray(seg).reshape(-1) > 0
  np.testing.assert_allclose(aux["active_fraction"], k_T[valid].mean() / E, rtol=1e-6)


def test_load_balance_and_z_loss_golden():
  """Hand-computed: E=2, top-1. Probabilities (3/4, 1/4), (1/4, 3/4), (3/4, 1/4) and a padding
  token. f = (2/3, 1/3); P = (1.75/3, 1.25/3); loss = 2 * (3.5 + 1.25) / 9 = 19/18.
  Every valid row has logsumexp = log 4, so z-loss = log(4)^2.
  Update only if the definition of the losses changes on purpose."""
  l3 = math.log(3.0)
  logits = jnp.asarray([[l3, 0.0], [0.0, l3], [l3, 0.0], [5.0, -5.0]])
  valid = jnp.asarray([True, True, True, False])
  probs, expert, weight = top_k_routing(logits, 1)
  np.testing.assert_array_equal(expert[:, 0], [0, 1, 0, 0])
  # A lone expert is weighted by its probability (model.moe.lone_expert="probability").
  np.testing.assert_allclose(weight[:, 0], [0.75, 0.75, 0.75, 1 / (1 + math.exp(-10.0))], rtol=1e-6)
  np.testing.assert_allclose(top_k_routing(logits, 1, lone_expert="one")[2], 1.0)
  aux = balance_stats(logits, probs, expert, valid, jnp.asarray([1, 2, 2, 0]))
  np.testing.assert_allclose(aux["load_balance_loss"], 19.0 / 18.0, rtol=1e-6)
  np.testing.assert_allclose(aux["router_z_loss"], math.log(4.0) ** 2, rtol=1e-6)
  np.testing.assert_allclose(aux["expert_load"], [2 / 3, 1 / 3], rtol=1e-6)
  np.testing.assert_allclose(aux["expert_load_by_modality"],
                             [[1.0, 0.0], [0.5, 0.5], [0.0, 0.0], [0.0, 0.0]], rtol=1e-6)


def test_uniform_router_gives_unit_balance_loss():
  logits = jnp.zeros((6, 4))
  probs, expert, _ = top_k_routing(logits, 2)
  # top_k breaks ties by index: every token takes experts 0 and 1, so f = (.5, .5, 0, 0).
  aux = balance_stats(logits, probs, expert, jnp.ones((6,), bool))
  np.testing.assert_allclose(aux["load_balance_loss"], 4 * (0.5 * 0.25 + 0.5 * 0.25), rtol=1e-6)


def test_top_k_weights_are_renormalised():
  logits = jax.random.normal(jax.random.key(1), (5, 8))
  probs, expert, weight = top_k_routing(logits, 3)
  np.testing.assert_allclose(weight.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(weight, jnp.take_along_axis(probs, expert, -1) /
                             jnp.take_along_axis(probs, expert, -1).sum(-1, keepdims=True),
                             rtol=1e-6)


def test_moe_aux_ignores_padding():
  cfg = MoEConfig(num_experts=E, top_k=TOP_K, expert_hidden=H, backend="blocked", block_rows=4)
  moe = MoE(D, cfg, rngs=nnx.Rngs(0))
  x, _, seg = _setup()
  _, aux = moe(x, seg)
  x_junk = x.at[1, 9:].set(100.0)                  # change only padding tokens
  _, aux_junk = moe(x_junk, seg)
  for k in ("load_balance_loss", "router_z_loss", "expert_load"):
    np.testing.assert_allclose(aux_junk[k], aux[k], rtol=1e-6, err_msg=k)
  np.testing.assert_allclose(aux["expert_load"].sum(), 1.0, rtol=1e-6)


def test_shared_experts_add_one_dense_swiglu_for_every_token():
  cfg = MoEConfig(num_experts=E, top_k=TOP_K, expert_hidden=H, backend="blocked", block_rows=4,
                  num_shared_experts=2)
  moe = MoE(D, cfg, rngs=nnx.Rngs(3))
  assert moe.shared.w_gate_DxH.shape == (D, 2 * H)
  x, r, seg = _setup()
  y, _ = moe(x, seg)
  routed = _reference({k: getattr(moe, k)[...] for k in
                       ("router_DxE", "w_gate_ExDxH", "w_up_ExDxH", "w_down_ExHxD")}, x)
  x2 = x.reshape(-1, D)
  s = moe.shared
  shared = (jax.nn.silu(x2 @ s.w_gate_DxH[...]) * (x2 @ s.w_up_DxH[...])) @ s.w_down_HxD[...]
  np.testing.assert_allclose(y, routed + shared.reshape(x.shape), rtol=1e-5, atol=1e-5)
  assert not hasattr(MoE(D, dataclasses.replace(cfg, num_shared_experts=0), rngs=nnx.Rngs(3)),
                     "shared"), "no shared experts by default: the parameter tree is unchanged"

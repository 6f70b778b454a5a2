"""The dynamic router (bounds, mass, minimality), its threshold controller, and the
auxiliary-loss-free balance bias."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimoe.model.config import MoEConfig
from omnimoe.model.router import (balance_stats, dynamic_routing, init_router_state, top_k_routing,
                          update_bias, update_router_state, update_threshold)

E = 16


def _logits(seed, T=256, scale=2.0):
  return scale * jax.random.normal(jax.random.key(seed), (T, E))


@pytest.mark.parametrize("threshold,k_min,k_max", [(0.3, 1, 4), (0.6, 1, 4), (0.9, 2, 5),
                                                   (0.99, 1, 3), (0.05, 2, 2)])
def test_dynamic_k_within_bounds_and_mass_reaches_threshold(threshold, k_min, k_max):
  logits = _logits(0)
  probs, expert, weight, used = map(np.asarray, dynamic_routing(logits, threshold, k_min, k_max))
  k_T = used.sum(-1)
  assert k_T.min() >= k_min and k_T.max() <= k_max
  assert np.all(used[:, :-1] >= used[:, 1:]), "slots are taken as a prefix"
  taken_p = np.take_along_axis(probs, expert, -1)
  assert np.all(np.diff(taken_p, axis=-1) <= 0), "experts by descending probability"
  mass_T = np.where(used, taken_p, 0).sum(-1)
  binds = k_T == k_max
  assert np.all(mass_T[~binds] >= threshold - 1e-6)
  # Minimal: one expert fewer would not have reached the threshold (or breaks k_min).
  mass_without_last = mass_T - taken_p[np.arange(len(k_T)), k_T - 1]
  assert np.all((mass_without_last < threshold) | (k_T == k_min))
  lone = k_T == 1     # one expert: weighted by its probability (model.moe.lone_expert)
  np.testing.assert_allclose(weight[~lone].sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(weight[lone, 0], taken_p[lone, 0], rtol=1e-6)
  assert np.all(weight[~used] == 0)
  if 0.3 <= threshold <= 0.9 and k_min < k_max:
    assert len(set(k_T.tolist())) > 1, "k must depend on the token (the test can fail)"


def test_dynamic_stats_count_only_used_slots():
  logits = _logits(1, T=64)
  probs, expert, _, used = dynamic_routing(logits, 0.5, 1, 4)
  valid = jnp.arange(64) < 60                       # 4 padding tokens
  modality = jnp.where(valid, jnp.arange(64) % 3 + 1, 0)
  aux = balance_stats(logits, probs, expert, valid, modality, used)
  k_T = np.asarray(used).sum(-1)[:60]
  np.testing.assert_allclose(aux["active_fraction"], k_T.mean() / E, rtol=1e-6)
  for m in range(3):
    np.testing.assert_allclose(aux["active_fraction_by_modality"][m],
                               k_T[np.arange(60) % 3 == m].mean() / E, rtol=1e-6)
  np.testing.assert_allclose(aux["expert_load"].sum(), 1.0, rtol=1e-6)
  counts = np.bincount(np.asarray(expert)[:60][np.asarray(used)[:60]], minlength=E)
  np.testing.assert_allclose(aux["expert_load"], counts / counts.sum(), rtol=1e-6)
  p = np.asarray(probs)[:60]
  np.testing.assert_allclose(aux["router_entropy"], (-(p * np.log(p)).sum(-1)).mean(), rtol=1e-5)


def test_controller_step_direction_and_clip():
  t = jnp.asarray([0.5, 0.5, 0.5])
  new = update_threshold(t, jnp.asarray([0.25, 0.125, 0.05]), 0.125, 0.1)
  assert new[0] < 0.5 and new[1] == pytest.approx(0.5) and new[2] > 0.5
  assert float(update_threshold(jnp.asarray(0.99), jnp.asarray(0.0), 0.125, 10.0)) == 1.0


@pytest.mark.parametrize("start", [0.05, 0.5, 0.95])
def test_controller_converges_on_a_synthetic_stream(start):
  """Fresh router logits every step (a stationary stream): the threshold settles where the mean
  active fraction is the target."""
  cfg = MoEConfig(num_experts=E, router="dynamic", target_active_fraction=0.125, k_min=1, k_max=6,
                  threshold_init=start, threshold_rate=0.1)

  @jax.jit
  def run(key):
    def step(state, key):
      logits = 1.5 * jax.random.normal(key, (512, E))
      probs, expert, _, used = dynamic_routing(logits, state["threshold"][0], cfg.k_min, cfg.k_max)
      aux = balance_stats(logits, probs, expert, jnp.ones((512,), bool), None, used)
      aux = {"active_fraction": aux["active_fraction"][None]}
      return update_router_state(state, aux, cfg), aux["active_fraction"][0]
    return jax.lax.scan(step, init_router_state(1, cfg), jax.random.split(key, 300))

  state, fractions = run(jax.random.key(0))
  fractions = np.asarray(fractions)
  assert abs(fractions[-100:].mean() - 0.125) < 0.005, fractions[-100:].mean()
  assert abs(fractions[0] - 0.125) > 0.01 or start == 0.5   # it had somewhere to go
  assert 0 < float(state["threshold"][0]) < 1


def test_bias_ranks_experts_but_does_not_weight_them():
  logits = _logits(2, T=32)
  bias = jnp.zeros((32, E)).at[:, 5].set(10.0)
  probs, expert, weight = top_k_routing(logits, 2, bias)
  assert np.all(np.asarray(expert)[:, 0] == 5)
  chosen = np.take_along_axis(np.asarray(probs), np.asarray(expert), -1)
  np.testing.assert_allclose(weight, chosen / chosen.sum(-1, keepdims=True), rtol=1e-6)
  _, d_expert, d_weight, used = dynamic_routing(logits, 0.5, 1, 4, bias)
  assert np.all(np.asarray(d_expert)[:, 0] == 5) and np.all(np.asarray(d_weight)[~np.asarray(used)] == 0)
  # No bias: the plain top-k.
  np.testing.assert_array_equal(top_k_routing(logits, 2)[1], jax.lax.top_k(probs, 2)[1])


def test_bias_update_sign_per_modality():
  load = jnp.asarray([[[0.5, 0.5, 0.0, 0.0], [0.25] * 4, [0.0] * 4]])   # [L=1, 3, E=4]
  new = update_bias(jnp.zeros((1, 3, 4)), load, 0.01)
  np.testing.assert_allclose(new[0, 0], [-0.01, -0.01, 0.01, 0.01])
  np.testing.assert_allclose(new[0, 1], 0.0)     # balanced: sign(0) = 0
  np.testing.assert_allclose(new[0, 2], 0.0)     # no audio tokens: unchanged


def test_bias_controller_balances_a_skewed_stream_per_modality():
  """Text favours expert 0, image expert 1 (by +2 logits): the per-modality biases bring each
  modality's busiest expert close to its fair share, without any loss term."""
  cfg = MoEConfig(num_experts=8, top_k=2, bias_update_rate=0.002)
  skew_MxE = jnp.zeros((3, 8)).at[0, 0].set(2.0).at[1, 1].set(2.0)
  modality = jnp.arange(600) % 3 + 1

  @jax.jit
  def run(key):
    def step(state, key):
      logits = jax.random.normal(key, (600, 8)) + skew_MxE[modality - 1]
      bias = state["bias"][0][modality - 1]
      probs, expert, _ = top_k_routing(logits, 2, bias)
      aux = balance_stats(logits, probs, expert, jnp.ones((600,), bool), modality)
      aux = {"expert_load_by_modality": aux["expert_load_by_modality"][None]}
      return update_router_state(state, aux, cfg), aux["expert_load_by_modality"][0]
    return jax.lax.scan(step, init_router_state(1, cfg), jax.random.split(key, 400))

  state, loads = run(jax.random.key(0))
  loads = np.asarray(loads)
  assert loads[0, 0, 0] > 0.3 and loads[0, 1, 1] > 0.3          # skewed at the start
  late = loads[-50:].mean(0)
  assert late[0].max() < 0.18 and late[1].max() < 0.18, late    # fair share is 1/8
  bias = np.asarray(state["bias"][0])
  assert bias[0, 0] < bias[0, 1] and bias[1, 1] < bias[1, 0]     # kept per modality

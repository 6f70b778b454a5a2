"""Sampling (train/sampling.py) against a numpy loop: what top-k and top-p keep, greedy, and the
frequencies of many draws."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimoe.train.sampling import NEG, Sampler, choose, cut_logits, log_prob


def _kept(logits, temperature, top_k, top_p):
  """The ids a row keeps, by a loop in float64 (ties broken as the code says: all stay)."""
  x = np.asarray(logits, np.float64) / temperature
  order = sorted(range(len(x)), key=lambda i: -x[i])
  keep = set(order)
  if top_k:
    kth = x[order[top_k - 1]]
    keep = {i for i in keep if x[i] >= kth}
  if top_p < 1:
    ids = [i for i in order if i in keep]
    p = np.exp(x[ids] - x[ids].max())
    p /= p.sum()
    mass, cut = 0.0, []
    for i, q in zip(ids, p):
      if mass < top_p:
        cut.append(i)
      mass += q
    keep = {i for i in keep if x[i] >= min(x[cut])}
  return keep


@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (5, 1.0), (8, 0.5), (0, 0.05)])
def test_cuts_keep_what_a_loop_keeps(top_k, top_p):
  logits = np.random.default_rng(1).normal(size=(6, 40)).astype(np.float32) * 2
  s = Sampler(temperature=0.7, top_k=top_k, top_p=top_p)
  out = np.asarray(cut_logits(s, jnp.asarray(logits)))
  for row, got in zip(logits, out):
    assert set(np.flatnonzero(got > NEG / 2)) == _kept(row, 0.7, top_k, top_p)


def test_greedy_and_draw_frequencies():
  logits = jnp.asarray([[0.0, 1.0, 2.0, -1.0, 0.5]])
  assert int(choose(Sampler(), jax.random.key(0), logits)[0]) == 2
  s = Sampler(temperature=1.0, top_p=0.8)
  draws = jax.vmap(lambda k: choose(s, k, logits)[0])(jax.random.split(jax.random.key(3), 20000))
  p = np.exp(np.asarray(logits[0], np.float64))
  p /= p.sum()                               # ids by mass: 2 (.563), 1 (.207), 4 (.126), 0 ...
  kept = [2, 1, 4]                           # mass before id 4 is .770 < .8, before id 0 .896
  want = np.zeros(5)
  want[kept] = p[kept] / p[kept].sum()
  freq = np.bincount(np.asarray(draws), minlength=5) / 20000
  np.testing.assert_allclose(freq, want, atol=0.015)
  np.testing.assert_allclose(float(log_prob(logits, jnp.asarray([1]))[0]), np.log(p[1]), rtol=1e-6)


def test_bad_settings_fail_in_one_line():
  for kw in ({"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}):
    with pytest.raises(ValueError, match="must be"):
      Sampler(**kw)

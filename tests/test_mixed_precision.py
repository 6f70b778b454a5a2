"""Mixed precision: float32 masters and optimizer state, bfloat16 compute where asked, float32 sums.

Oracles: float64 numpy sums of the same bfloat16 values (every product of two bfloat16 numbers is
exact in float64), and the lowered train step's own program text for the matmuls' dtypes."""
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from omnimoe import data
from omnimoe.model import grouped_matmul as gmm
from omnimoe.train import config as config_lib
from omnimoe.train.mesh import batch_sharding, global_batch, make_mesh
from omnimoe.train.state import make_setup
from omnimoe.train.step import make_train_step
from test_memory import TINY


def _bf16(rng, shape):
  return rng.standard_normal(shape).astype(ml_dtypes.bfloat16)


def test_bfloat16_parameters_are_refused_in_one_line():
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load(None, ["model.param_dtype=bfloat16"])
  assert str(e.value).startswith("config key 'model.param_dtype' must be float32 (got 'bfloat16')")
  assert "\n" not in str(e.value)


def test_blocked_weight_gradient_sums_bfloat16_tiles_in_float32():
  """One expert over 4,096 rows in 128 tiles of 32: dw = x^T dy is a sum over all rows. Summed in
  bfloat16 its relative error is ~1e-2; in float32, ~1e-6."""
  rng = np.random.default_rng(0)
  R, K, N, E = 4096, 16, 8, 2
  x, dy = _bf16(rng, (R, K)), _bf16(rng, (R, N))
  w = rng.standard_normal((E, K, N)).astype(np.float32)
  expert = (np.arange(R) >= R - 64).astype(np.int32)[:, None]     # 4,032 rows on expert 0
  plan = gmm.plan_dispatch(jnp.asarray(expert), E, backend="blocked", block_rows=32)
  order = np.argsort(expert[:, 0], kind="stable")                  # the layout's row order

  y, vjp = jax.vjp(lambda w: plan.matmul(jnp.asarray(x[order]), w), jnp.asarray(w))
  assert y.dtype == jnp.bfloat16
  (dw,) = vjp(jnp.asarray(dy[order]))
  assert dw.dtype == jnp.float32
  x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
  for e in range(E):
    rows = expert[:, 0] == e
    ref = x64[rows].T @ dy64[rows]
    err = np.abs(np.asarray(dw[e], np.float64) - ref).max() / np.abs(ref).max()
    assert err < 1e-5, (e, err)


def test_moe_combine_sums_in_float32():
  """Eight bfloat16 expert outputs per token, weighted and summed: with a float32 sum the result is
  the exact sum rounded once to bfloat16 (a few ties aside); a bfloat16 sum rounds at every add."""
  rng = np.random.default_rng(1)
  S, K, D, E = 512, 8, 16, 8
  expert = np.stack([rng.permutation(E) for _ in range(S)]).astype(np.int32)
  weights = rng.dirichlet(np.ones(K), S).astype(np.float32)
  plan = gmm.plan_dispatch(jnp.asarray(expert), E, backend="blocked", block_rows=32)
  y_assign = _bf16(rng, (S * K, D))
  # Rows in the layout's order: the row of assignment a sits at slot_SxK.flat[a].
  y_rows = np.zeros((S * K, D), ml_dtypes.bfloat16)
  y_rows[np.asarray(plan.slot_SxK).reshape(-1)] = y_assign
  got = np.asarray(gmm.combine(plan, jnp.asarray(y_rows), jnp.asarray(weights)))
  assert got.dtype == ml_dtypes.bfloat16
  exact = np.einsum("skd,sk->sd", y_assign.astype(np.float64).reshape(S, K, D),
                    weights.astype(np.float64))
  rounded_once = exact.astype(np.float32).astype(ml_dtypes.bfloat16)
  assert np.mean(got == rounded_once) > 0.99


def _lowered_step(dtype: str):
  cfg = config_lib.load(None, [*TINY, f"model.dtype={dtype}"])
  mesh = make_mesh(cfg.mesh)
  info = data.dataset_info(cfg.data, cfg.train.seed)
  setup = make_setup(cfg, mesh, info)
  state = setup.abstract_state           # shapes and dtypes as init_state makes them
  it = data.train_iterator(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
  step = make_train_step(cfg, setup, batch_sharding(mesh, cfg.data.seq_len))
  return state, step.lower(state, global_batch(next(it), mesh)).as_text(debug_info=True)


def _dots(text: str) -> list[tuple[str, str]]:
  """(element type of the first operand, source name) of each dot_general in a StableHLO module."""
  names = dict(re.findall(r'^#(loc\d+) = loc\("([^"]*)"', text, re.M))
  dots = []
  for line in text.splitlines():
    if "stablehlo.dot_general" in line:
      dtype = re.search(r":\s*\(tensor<[^>]*?x?(bf16|f32|f64)>", line)
      loc = re.search(r"loc\(#(loc\d+)\)\s*$", line)
      dots.append((dtype.group(1) if dtype else "?", names.get(loc.group(1), "?") if loc else "?"))
  return dots


# The float32 matmuls of a bfloat16 step, by where they come from: the router and its statistics
# and the combine by design; attention's backward (its forward asks for float32 scores) and the
# head's backward (fed by the float32 cross entropy) as they are today (docs/scale.md).
FLOAT32_BY_DESIGN = ("/router/", "skd,sk->sd", "transpose(jvp(attention))/attend/",
                     "transpose(jvp(head))/")


def test_bfloat16_compute_keeps_float32_masters_and_runs_its_matmuls_in_bfloat16():
  state, text = _lowered_step("bfloat16")
  leaves = jax.tree.leaves({k: state[k] for k in ("params", "opt_state")})
  float_leaves = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
  assert float_leaves and all(x.dtype == jnp.float32 for x in float_leaves)
  dots = _dots(text)
  assert len(dots) > 20 and all(name != "?" for _, name in dots)
  f32 = [name for dtype, name in dots if dtype != "bf16"]
  bf16 = [name for dtype, name in dots if dtype == "bf16"]
  # Every float32 matmul is one of those, and the projections, experts, attention's forward, the
  # embedding and the head's forward are bfloat16.
  assert all(any(k in name for k in FLOAT32_BY_DESIGN) for name in f32), sorted(set(f32))
  for part in ("jvp(attention)/qkv/", "jvp(attention)/attend/", "jvp(head)/", "jvp(embed)/",
               "while/body/"):
    assert any(part in name for name in bf16), (part, sorted(set(bf16)))
  assert len(bf16) > 0.6 * len(dots)

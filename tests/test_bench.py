"""The benchmark scripts run end to end on tiny shapes and write what they promise."""
import json

import pytest

from bench import moe as bench_moe
from bench import step as bench_step


def test_moe_bench_writes_one_row_per_experts_and_backend(tmp_path, capsys):
  out = tmp_path / "moe.json"
  rows = bench_moe.main(["--experts", "4", "8", "--backends", "blocked", "onehot", "ragged_dot",
                         "--tokens", "64", "--d-model", "8", "--expert-hidden", "8",
                         "--repeats", "1", "--max-gb", "1.5e-4", "--json", str(out)])
  written = json.loads(out.read_text())
  assert written == rows
  assert [(r["experts"], r["backend"]) for r in written] == [
      (e, b) for e in (4, 8) for b in ("blocked", "onehot", "ragged_dot")]
  ran = [r for r in written if r["backend"] != "ragged_dot" or r["experts"] == 4]
  assert all(r["ms"] > 0 and {"experts", "backend", "ms"} <= r.keys() for r in ran)
  # ragged_dot at 8 experts needs ~2.1e-4 GB by the estimate, over the budget: kept, marked.
  skipped = written[-1]
  assert skipped["ms"] is None and "needs" in skipped["skipped"]
  printed = capsys.readouterr().out
  assert "| growth 4->8 |" in printed and "onehot ms" in printed and "skipped" in printed


def test_onehot_baseline_equals_the_moe_layer():
  """The baseline computes the same function as the layer (so the timings compare like with like)."""
  import jax
  import numpy as np
  from flax import nnx
  from omnimoe.model.config import MoEConfig
  from omnimoe.model.moe import MoE
  cfg = MoEConfig(num_experts=16, top_k=2, expert_hidden=8, backend="blocked")
  layer = MoE(8, cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 32, 8))
  y, _ = layer(x, np.ones((1, 32), np.int32))
  params = {k: v[...] for k, v in nnx.state(layer).items()}
  np.testing.assert_allclose(bench_moe.onehot_moe(params, x[0], 2), y[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_step_bench_runs(capsys):
  bench_step.main(["blocked:8", "--batch", "2", "--seq", "16", "--steps", "1"])
  assert "tokens/s" in capsys.readouterr().out


def test_attention_bench_times_before_and_after_on_the_same_inputs(tmp_path, capsys):
  from bench import attention as bench_attention
  out = tmp_path / "attn.json"
  bench_attention.main(["--lengths", "64", "96", "--block", "16", "--repeats", "1", "--docs", "2",
                        "--json", str(out)])
  rows = json.loads(out.read_text())
  assert [(r["tokens"], r["impl"]) for r in rows] == [
      (L, impl) for L in (64, 96) for impl in ("before", "after")]
  for before, after in zip(rows[::2], rows[1::2]):
    assert before["ms"] > 0 and after["ms"] > 0
    # The same attention: the loss is sum(out * r) over L*H*Dh float32 terms that cancel to a few
    # units, so the two may differ by about float32 eps per term (the outputs themselves are
    # checked against a float64 oracle in test_model_attention.py).
    terms = before["tokens"] * before["heads"] * before["head_dim"]
    assert abs(after["loss"] - before["loss"]) <= 1.2e-7 * terms
    nb = before["tokens"] // 16
    assert before["pairs_all"] == nb * nb and after["pairs_computed"] < nb * (nb + 1) // 2
  assert "| 96 |" in capsys.readouterr().out

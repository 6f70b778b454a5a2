"""The benchmark scripts run end to end on tiny shapes and write what they promise."""
import json
import math
import re

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
  for r in written:
    assert (r["tokens"], r["top_k"], r["d_model"], r["expert_hidden"]) == (64, 2, 8, 8)
  for r in ran:
    assert r["repeats"] == 1 and math.isfinite(r["ms"]) and math.isfinite(r["cpu_ms"])
    assert r["cpu_ms"] >= 0
  # Both printed tables (wall ms, process CPU ms) hold the rows' figures, and each backend's
  # growth 4->8 is the quotient of its two times.
  printed = capsys.readouterr().out
  for key, unit in (("ms", "ms"), ("cpu_ms", "CPU ms")):
    table = markdown_table(printed, f"| experts | blocked {unit} | onehot {unit} | ragged_dot {unit} |")
    assert [row[0] for row in table] == ["4", "8", "growth 4->8"]
    for cells, E in zip(table, (4, 8)):
      for cell, backend in zip(cells[1:], ("blocked", "onehot", "ragged_dot")):
        r = next(r for r in written if (r["experts"], r["backend"]) == (E, backend))
        assert cell == ("skipped" if r["ms"] is None else f"{r[key]:.1f}"), (key, E, backend)
    by = {(r["experts"], r["backend"]): r[key] for r in ran}
    growth = table[2][1:]
    assert growth[2] == "-"                          # ragged_dot has no 8-expert time
    for cell, backend in zip(growth[:2], ("blocked", "onehot")):
      assert cell == f"{by[8, backend] / by[4, backend]:.2f}x", (key, backend)


def markdown_table(text: str, header: str) -> list[list[str]]:
  """The body rows (cells stripped) of the markdown table under `header` in `text`."""
  lines = text.splitlines()
  start = lines.index(header) + 2                    # past the header and the |---:| line
  rows = []
  for line in lines[start:]:
    if not line.startswith("|"):
      break
    rows.append([c.strip() for c in line.strip("|").split("|")])
  return rows


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


STEP_LINE = re.compile(r"^(\S+)\s+loss (\S+)  compile\s+(\S+)s  step median\s+(\S+) ms"
                       r"  min\s+(\S+) ms\s+(\S+) tokens/s$")


@pytest.mark.slow
def test_step_bench_prints_a_consistent_line_per_variant(capsys):
  """One line per variant, in order; the blocked grouped matmul and the dense oracle give the same
  loss (same model and batch), and tokens/s is the batch's 2 x 16 tokens over the median time
  (up to the printed rounding: ms to 1, tokens/s to 1)."""
  bench_step.main(["blocked:8", "dense", "--batch", "2", "--seq", "16", "--steps", "3"])
  lines = [STEP_LINE.match(l) for l in capsys.readouterr().out.splitlines()]
  assert all(lines) and [m[1] for m in lines] == ["blocked:8", "dense"], lines
  losses = []
  for m in lines:
    loss, compile_s, median, fastest, tokens_per_s = (float(x) for x in m.groups()[1:])
    assert all(math.isfinite(x) for x in (loss, compile_s, median, fastest, tokens_per_s))
    assert compile_s > 0 and median >= fastest > 0, m[0]
    lo, hi = 32e3 / (median + 0.5), 32e3 / max(median - 0.5, 1e-9)
    assert lo - 0.5 <= tokens_per_s <= hi + 0.5, m[0]
    losses.append(loss)
  assert losses[0] == pytest.approx(losses[1], abs=1e-4)      # printed to 4 decimals


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

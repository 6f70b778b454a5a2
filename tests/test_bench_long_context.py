"""bench/long_context.py runs end to end at tiny lengths and writes what it promises."""
import json

import numpy as np
import pytest

from bench import long_context
from omnimoe.data.config import feature_dim
from omnimoe.train import config as config_lib

SMALL = ["model.num_layers=1", "model.num_dense_layers=0", "model.d_model=32", "model.num_heads=2",
         "model.num_kv_heads=1", "model.head_dim=16", "model.rope_sections=[4,2,2]",
         "model.dense_hidden=32", "model.moe.num_experts=4", "model.moe.expert_hidden=32",
         "model.attention_block=64"]


@pytest.mark.slow     # eight compiles of the train step: about 60 s on the 2-core machine
def test_long_context_bench_rows_ratios_and_table(tmp_path, capsys):
  out = tmp_path / "lc.json"
  result = long_context.main(["--lengths", "128", "256", "--remat", "none", "full",
                              "--loss-chunk", "64", "--json", str(out), *SMALL])
  assert json.loads(out.read_text()) == json.loads(json.dumps(result))
  rows = [r for r in result["rows"] if r["devices"] == 1]
  assert [(r["tokens"], r["remat"]) for r in rows] == [
      (128, "none"), (256, "none"), (128, "full"), (256, "full")]
  context = [r for r in result["rows"] if r["devices"] > 1]
  assert [(r["tokens"], r["devices"], r["exchange"], r["remat"]) for r in context] == [
      (128, 8, "all_gather", "none"), (256, 8, "all_gather", "none"),
      (128, 8, "ring", "none"), (256, 8, "ring", "none")]
  for r in context:          # the same step on 8 devices: the same loss as on one
    one = [o for o in rows if (o["tokens"], o["remat"]) == (r["tokens"], "none")][0]
    assert r["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert r["temp_bytes"] > 0 and r["step_s"] > 0
  for r in rows:
    assert r["devices"] == 1 and r["batch_size"] == 1 and r["loss_chunk"] == 64
    assert r["doc_len"] == 0 and r["documents"] == 1     # by default one document fills the row
    assert r["peak_bytes"] == r["temp_bytes"] + r["argument_bytes"] + r["output_bytes"]
    assert r["temp_bytes"] > 0 and r["compile_s"] > 0 and r["step_s"] > 0
    assert np.isfinite(r["loss"]) and len(r["step_times_s"]) == 1
  # The arguments are the state plus one batch row: the state does not depend on the length, and
  # each extra position costs int32 tokens, segment ids, targets, 3 positions, float32 weight,
  # int8 modality and F float32 features.
  F = feature_dim(config_lib.load(None, SMALL).data)
  per_token = 4 + 4 + 4 + 3 * 4 + 4 + 1 + 4 * F
  arg = {(r["tokens"], r["remat"]): r["argument_bytes"] for r in rows}
  for remat in ("none", "full"):
    assert arg[256, remat] - arg[128, remat] == 128 * per_token
  assert arg[128, "none"] == arg[128, "full"]
  growth = result["ratios"]
  assert [(g["remat"], g["exchange"], g["from"], g["to"]) for g in growth] == [
      ("none", "none", 128, 256), ("full", "none", 128, 256),
      ("none", "all_gather", 128, 256), ("none", "ring", 128, 256)]
  growth = [g for g in growth if g["exchange"] == "none"]
  by = {(r["tokens"], r["remat"]): r for r in rows}
  for g in growth:
    assert g["attention_flops_ratio"] == 4.0 and g["memory_goal"] == 2.25
    short, long = by[128, g["remat"]], by[256, g["remat"]]
    assert g["memory_ratio"] == long["peak_bytes"] / short["peak_bytes"]
    assert g["time_ratio"] == long["step_s"] / short["step_s"]
  printed = capsys.readouterr().out
  assert ("| tokens | devices | exchange | remat | loss_chunk | compile s | step s | peak MiB "
          "(temp+arg+out) |") in printed
  assert printed.count("| 256 | 1 | none | full | 64 |") == 1
  assert printed.count("| 256 | 8 | ring | none | 64 |") == 1
  assert "1 device, remat none, 128 -> 256 tokens: peak memory" in printed
  assert "8 devices, ring, remat none, 128 -> 256 tokens: peak memory" in printed
  assert "causal attention FLOPs 4x" in printed


@pytest.mark.parametrize("flag, value, message", [("--repeats", "0", "--repeats must be >= 1"),
                                                  ("--doc-len", "-1", "--doc-len must be >= 0"),
                                                  ("--context", "9", "--context must be 0 or")])
def test_long_context_bench_refuses_bad_flags_in_one_line(capsys, flag, value, message):
  with pytest.raises(SystemExit):
    long_context.main([flag, value])
  assert message in capsys.readouterr().err

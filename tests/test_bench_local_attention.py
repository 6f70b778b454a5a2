"""bench/local_attention.py runs end to end at a tiny length and writes what it prints."""
import json

import numpy as np

from bench import local_attention


def test_local_attention_bench_rows_and_ratio(tmp_path, capsys):
  out = tmp_path / "la.json"
  result = local_attention.main(["--seq", "256", "--batch", "1", "--steps", "1", "--window",
                                 "32", "--json", str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(result))
  assert [r["variant"] for r in result["rows"]] == ["global", "local first layer"]
  assert all(np.isfinite(r["loss"]) and r["step_s"] > 0 for r in result["rows"])
  # the window changes what the first layer sees, so the same parameters give another loss
  assert result["rows"][0]["loss"] != result["rows"][1]["loss"]
  assert result["global_over_local"] == result["rows"][0]["step_s"] / result["rows"][1]["step_s"]
  assert "global / local step time" in capsys.readouterr().out

"""bench/data.py runs end to end on a small model and writes the table and JSON it promises."""
import json

from bench import data as bench_data

SMALL = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1",
         "model.head_dim=16", "model.rope_sections=[4,2,2]", "model.moe.num_experts=4",
         "model.moe.expert_hidden=32", "train.batch_size=8", "data.seq_len=64"]


def test_data_bench_times_both_pipelines_and_the_model(tmp_path, capsys):
  out = tmp_path / "bench.json"
  result = bench_data.main([*SMALL, "--batches", "2", "--steps", "1", "--examples", "12",
                            "--json", str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(result))
  assert set(result["pipelines"]) == {"default", "prepared"}
  steps_per_s = result["model"]["steps_per_s"]
  for row in result["pipelines"].values():
    assert row["batches_per_s"] > 0 and row["examples_per_s"] > row["batches_per_s"]
    assert 0 < row["fill"] <= 1
    assert abs(row["ratio_to_train_steps"] - row["batches_per_s"] / steps_per_s) < 1e-9
  assert result["prepare"]["examples"] == 12 and result["seq_len"] == 64
  printed = capsys.readouterr().out
  assert "| prepared |" in printed and "| default |" in printed and "steps/s" in printed

"""`omnimoe report`: expert-load heatmaps and loss curves from metrics.jsonl, and clean errors."""
import json
import subprocess
import sys
import pathlib

import numpy as np
import pytest

from omnimoe.train import report
from omnimoe.train.cli import main
from omnimoe.train.metrics import MetricsWriter

E = 4
TEXT = np.array([0.4, 0.3, 0.2, 0.1])
AUDIO = [0.0, 0.0, 0.5, 0.5]


def train_row(step: int) -> dict:
  """A train row with the telemetry keys of docs/moe.md for two MoE layers (blocks 1
  and 2) and no image tokens (so no image keys); the text load moves with the step."""
  row = {"loss": 5.0 / step, "tokens_per_s": 100.0, "moe/active_fraction": 0.5}
  for layer in (1, 2):
    row[f"moe/expert_load/layer_{layer}"] = [0.25] * E
    row[f"moe/expert_load/text/layer_{layer}"] = np.roll(TEXT, step).tolist()
    row[f"moe/expert_load/audio/layer_{layer}"] = AUDIO
  return row


def write_run(workdir: pathlib.Path, steps=(1, 2, 3, 4)) -> None:
  """metrics.jsonl as the train loop writes it: train rows, and eval rows every second step."""
  writer = MetricsWriter(workdir)
  for step in steps:
    writer.write(step, train_row(step))
    if step % 2 == 0:
      writer.write(step, {"eval/loss": 3.0 / step, "eval/loss/text": 2.0 / step,
                          "eval/loss/audio": 40.0 / step, "eval/image_to_text_accuracy": 0.5})
  writer.close()


def is_png(path: pathlib.Path) -> bool:
  return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_writes_the_pictures_and_prints_their_paths(tmp_path, capsys):
  write_run(tmp_path)
  out = tmp_path / "pictures"
  assert main(["report", "--workdir", str(tmp_path), "--out", str(out)]) == 0
  printed = capsys.readouterr().out.split()
  assert printed == [str(out / "expert_load.png"), str(out / "loss.png")]
  for name in printed:
    path = pathlib.Path(name)
    assert path.stat().st_size > 10_000 and is_png(path)
  # Default --out: the workdir itself.
  assert main(["report", "--workdir", str(tmp_path)]) == 0
  assert capsys.readouterr().out.split() == [str(tmp_path / "expert_load.png"),
                                             str(tmp_path / "loss.png")]


def test_expert_load_is_the_mean_of_the_last_logged_steps(tmp_path):
  write_run(tmp_path)
  rows = report.load_metrics(tmp_path)
  loads, steps = report.expert_load(rows, last=2)
  assert steps == [3, 4]
  assert sorted(loads) == [1, 2]
  assert sorted(loads[1]) == ["audio", "text"], "image had no tokens: no row, not zeros"
  expected = (np.roll(TEXT, 3) + np.roll(TEXT, 4)) / 2
  np.testing.assert_allclose(loads[2]["text"], expected, rtol=1e-6)
  np.testing.assert_allclose(loads[1]["audio"], [0, 0, 0.5, 0.5])
  loads, steps = report.expert_load(rows, last=100)
  assert steps == [1, 2, 3, 4]
  np.testing.assert_allclose(loads[1]["text"], [0.25] * E, rtol=1e-6)   # a full roll averages out


def test_a_resumed_run_counts_each_step_once(tmp_path):
  """A run killed after step 3 and resumed from step 2 logs step 3 twice: the later row wins."""
  write_run(tmp_path, steps=(1, 2, 3))
  write_run(tmp_path, steps=(3, 4))
  rows = report.load_metrics(tmp_path)
  _, steps = report.expert_load(rows, last=10)
  assert steps == [1, 2, 3, 4]
  assert len(report.plot_losses(rows, tmp_path / "loss.png").read_bytes()) > 10_000


@pytest.mark.parametrize("setup, needle", [
    ("missing", "does not exist"),
    ("empty", "no metrics.jsonl in"),
    ("no_moe", "no per-modality expert-load keys"),
    ("not_json", "line 2 is not JSON"),
])
def test_bad_workdirs_exit_2_with_one_line(tmp_path, capsys, setup, needle):
  workdir = tmp_path / "run"
  if setup != "missing":
    workdir.mkdir()
  if setup == "no_moe":
    (workdir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
  if setup == "not_json":
    (workdir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n{oops\n")
  assert main(["report", "--workdir", str(workdir)]) == 2
  captured = capsys.readouterr()
  assert captured.out == "" and captured.err.count("\n") == 1
  assert captured.err.startswith("omnimoe: error: ") and needle in captured.err
  assert not list(tmp_path.rglob("*.png"))


def test_report_takes_no_config_overrides(tmp_path, capsys):
  write_run(tmp_path)
  assert main(["report", "--workdir", str(tmp_path), "model.num_layers=2"]) == 2
  assert "report takes no config or overrides" in capsys.readouterr().err
  assert main(["report", "--workdir", str(tmp_path), "--last", "0"]) == 2
  assert "--last must be at least 1" in capsys.readouterr().err


def test_report_reads_the_modality_table_without_importing_jax():
  """report names modalities from the one table (model/modality.py) and stays cheap: no jax."""
  code = ("import sys, omnimoe.train.report as r, omnimoe.model.modality as m; "
          "assert r.MODALITIES == m.NAMES == ('text', 'image', 'audio', 'video'); "
          "assert 'jax' not in sys.modules, 'report imported jax'")
  subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_report_reads_what_a_real_train_step_logs(tmp_path, capsys):
  """The keys come from the real producer: one train step of a tiny model, logged by the loop's
  own metrics line and writer."""
  import jax

  from omnimoe import data
  from omnimoe.train import config as config_lib
  from omnimoe.train.loop import _metrics_line
  from omnimoe.train.mesh import batch_sharding, global_batch, make_mesh
  from omnimoe.train.state import init_state, make_setup
  from omnimoe.train.step import make_train_step

  cfg = config_lib.load(None, [
      "model.num_layers=2", "model.num_dense_layers=1", "model.d_model=32", "model.num_heads=2",
      "model.num_kv_heads=1", "model.head_dim=16", "model.rope_sections=[4,2,2]",
      "model.moe.num_experts=4", "model.moe.expert_hidden=32", "data.seq_len=64",
      "train.batch_size=8"])
  mesh = make_mesh()
  setup = make_setup(cfg, mesh, data.dataset_info(cfg.data, cfg.train.seed))
  step = make_train_step(cfg, setup, batch_sharding(mesh))
  it = data.train_iterator(cfg.data, batch_size=8, seed=0)
  _, raw = step(init_state(cfg, setup), global_batch(next(it), mesh))
  it.close()
  writer = MetricsWriter(tmp_path)
  writer.write(1, _metrics_line(jax.device_get(raw), tokens=512, seconds=1.0))
  writer.close()
  loads, steps = report.expert_load(report.load_metrics(tmp_path))
  assert steps == [1] and list(loads) == [1], "block 0 is dense: one MoE layer, block 1"
  assert "text" in loads[1] and len(loads[1]["text"]) == 4
  for load in loads[1].values():
    assert abs(load.sum() - 1) < 1e-5
  assert main(["report", "--workdir", str(tmp_path)]) == 0
  assert len(capsys.readouterr().out.split()) == 2

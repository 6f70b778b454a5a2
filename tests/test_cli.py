"""The command line end to end: train, resume, exact resume after SIGKILL, eval, config, bad input."""
import gzip
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from omnimoe import data
from omnimoe.train import config as config_lib
from omnimoe.train.checkpoint import Checkpoints
from omnimoe.train.cli import main
from omnimoe.train.mesh import global_batch, make_mesh
from omnimoe.train.state import make_setup
from conftest import jax_cache_env
from oracles import recount_active_fractions

ROOT = pathlib.Path(__file__).parent.parent
# A model small enough that a few steps take seconds on 2 cores.
SMALL = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1",
         "model.head_dim=16", "model.rope_sections=[4,2,2]", "model.moe.num_experts=4",
         "model.moe.expert_hidden=32", "data.seq_len=64", "train.batch_size=8",
         "eval.batch_size=8", "eval.num_batches=1", "eval.image_limit=16", "eval.audio_limit=16",
         "eval.text_limit=2", "train.log_every=1"]


# The runs here repeat one another's programs: they share the session's compilation cache.
ENV = {**os.environ, **jax_cache_env()}


def run_cli(*args, **kw):
  return subprocess.run([sys.executable, "-m", "omnimoe.train.cli", *args], cwd=ROOT, capture_output=True,
                        text=True, env=ENV, **kw)


def metrics(workdir):
  return [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def assert_eval_is_the_runs(result, workdir):
  """`omnimoe eval`'s figures for the latest checkpoint equal those the run logged at that step
  (every run evaluates at its last step), the loss lies between its per-modality parts (a mean
  weighted by target counts), and each cross-modal accuracy counts whole prompts (16 of each in
  SMALL: eval.image_limit, eval.audio_limit)."""
  logged = [r for r in metrics(workdir) if "eval/loss" in r and r["step"] == result["step"]]
  assert len(logged) == 1, logged
  keys = {k for k in result if k.startswith("eval/")}
  assert keys == {k for k in logged[0] if k.startswith("eval/")}
  for k in keys:
    assert result[k] == pytest.approx(logged[0][k], rel=1e-6), k
  parts = [result[f"eval/loss/{m}"] for m in ("text", "image", "audio")]
  assert min(parts) <= result["eval/loss"] <= max(parts)
  for m in ("image", "audio"):
    correct = result[f"eval/{m}_to_text_accuracy"] * 16
    assert correct == round(correct), (m, correct)


def final_params(workdir):
  import orbax.checkpoint as ocp
  ckpt = pathlib.Path(workdir).absolute() / "checkpoints"
  step = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
  with ocp.StandardCheckpointer() as c:
    return step, c.restore(ckpt / str(step) / "state")["params"]


@pytest.mark.slow
def test_train_resume_eval_end_to_end(tmp_path, capsys):
  wd = tmp_path / "run"
  assert main(["train", *SMALL, "train.steps=4", "checkpoint.every_steps=2", "eval.every_steps=2",
               "--workdir", str(wd)]) == 0
  out = capsys.readouterr().out
  assert "finished 4 steps" in out and str(wd / "metrics.jsonl") in out
  rows = metrics(wd)
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
  for r in train_rows:
    assert {"loss", "tokens_per_s", "load_balance_loss", "router_z_loss"} <= set(r)
  eval_rows = [r for r in rows if "eval/loss" in r]
  assert [r["step"] for r in eval_rows] == [2, 4]
  for key in ("eval/image_to_text_accuracy", "eval/audio_to_text_accuracy", "eval/text_bits_per_byte",
              "eval/loss/text", "eval/loss/image", "eval/loss/audio"):
    assert key in eval_rows[-1]
  assert sorted(p.name for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
  assert list((wd / "tensorboard").iterdir())

  # The same command again: the run is finished, says so, exits 0.
  assert main(["train", *SMALL, "train.steps=4", "--workdir", str(wd)]) == 0
  assert "already finished at step 4" in capsys.readouterr().out
  # More steps: resumes from step 4, not from scratch; with a profile of steps 5..6.
  assert main(["train", *SMALL, "train.steps=6", "checkpoint.every_steps=2", "eval.every_steps=0",
               "--workdir", str(wd), "--profile-steps", "5:6"]) == 0
  assert [r["step"] for r in metrics(wd) if "loss" in r] == [1, 2, 3, 4, 5, 6]
  out, err = capsys.readouterr()
  assert "finished 6 steps" in out
  assert f"profile of steps 5..6 in {wd / 'profile'}" in err
  assert [p.stat().st_size > 0 for p in (wd / "profile").rglob("*.xplane.pb")] == [True]
  [trace] = (wd / "profile").rglob("*.trace.json.gz")
  names = [e.get("name") for e in json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]]
  # The train step's program ran once per traced step: twice (steps 5 and 6).
  assert names.count("CommonPjRtLoadedExecutable::Execute (jit_train_step)") == 2
  # eval of the latest checkpoint uses the run's own saved config: it gives what the run logged.
  assert main(["eval", "--workdir", str(wd)]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["step"] == 6
  assert_eval_is_the_runs(result, wd)


@pytest.mark.slow
def test_sigkill_midway_then_resume_is_bit_identical(tmp_path):
  args = [*SMALL, "train.steps=8", "checkpoint.every_steps=2", "eval.every_steps=0"]  # async saves
  full = run_cli("train", *args, "--workdir", str(tmp_path / "full"))
  assert full.returncode == 0, full.stderr

  killed_dir = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, "-m", "omnimoe.train.cli", "train", *args, "--workdir",
                           str(killed_dir)], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (killed_dir / "checkpoints" / "4").is_dir() and proc.poll() is None:
    assert time.time() < deadline, "no checkpoint at step 4 within 5 minutes"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  steps_done = [r["step"] for r in metrics(killed_dir) if "loss" in r]
  assert steps_done and steps_done[-1] < 8, "the run finished before it could be killed"

  resumed = run_cli("train", *args, "--workdir", str(killed_dir))
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from" in resumed.stderr
  final = lambda wd: [r for r in metrics(wd) if "loss" in r][-1]
  assert final(killed_dir)["step"] == 8
  assert final(killed_dir)["loss"] == final(tmp_path / "full")["loss"]
  step_a, params_a = final_params(tmp_path / "full")
  step_b, params_b = final_params(killed_dir)
  assert step_a == step_b == 8
  import jax
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_config_command_prints_resolved_config(capsys):
  assert main(["config", str(ROOT / "configs/tiny.yaml"), "model.num_layers=2"]) == 0
  out = capsys.readouterr().out
  assert "num_layers: 2" in out and "seq_len: 128" in out


def test_config_command_finds_a_shipped_config_by_name_from_any_folder(tmp_path, monkeypatch,
                                                                        capsys):
  import yaml
  written = yaml.safe_load((ROOT / "configs/dynamic16.yaml").read_text())
  monkeypatch.chdir(tmp_path)
  for name in ("dynamic16", "configs/dynamic16.yaml"):
    assert main(["config", name, "train.steps=3"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["model"]["moe"] == {**out["model"]["moe"], **written["model"]["moe"]}, name
    assert out["train"]["steps"] == 3
  assert main(["config", "nosuch"]) == 2
  assert "config file 'nosuch' does not exist (shipped configs: " in capsys.readouterr().err


@pytest.mark.parametrize("args, needle", [
    (["train", "model.num_layer=2"], "unknown config key 'model.num_layer' (did you mean 'model.num_layers'?)"),
    (["train", "train.steps=abc"], "config key 'train.steps' expects an integer"),
    (["config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    (["eval"], "eval needs --workdir"),
    (["train", "model.moe.dispatch=ragged_all_to_all"], "needs a GPU or TPU (XLA:CPU does not"),
    (["plan", "model.moe.dispatch=ragged_all_to_all", "mesh.within_rack.expert=2",
      "mesh.within_rack.data=2"], "plan it for one with --platform gpu"),
])
def test_bad_arguments_exit_2_with_one_line(args, needle):
  proc = run_cli(*args)
  assert proc.returncode == 2
  assert proc.stderr.strip().count("\n") == 0, proc.stderr
  assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  proc = run_cli("train", *SMALL, "train.steps=1", "--workdir", str(blocker / "run"))
  assert proc.returncode == 2
  assert "cannot write to workdir" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_non_finite_loss_exits_4_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
  from omnimoe import data
  real = data.train_iterator

  class Poisoned:
    """Yields the real batches, with NaN features from the 5th batch on."""
    def __init__(self, *a, **kw):
      self.inner, self.count = real(*a, **kw), 0
    def __next__(self):
      batch = dict(next(self.inner))
      self.count += 1
      if self.count >= 5:
        batch["features"] = np.full_like(batch["features"], np.nan)
      return batch
    def get_state(self):
      return self.inner.get_state()
    def set_state(self, s):
      self.inner.set_state(s)
    def close(self):
      self.inner.close()

  monkeypatch.setattr(data, "train_iterator", Poisoned)
  wd = tmp_path / "nan"
  code = main(["train", *SMALL, "train.steps=8", "checkpoint.every_steps=2", "eval.every_steps=0",
               "--workdir", str(wd)])
  err = capsys.readouterr().err
  assert code == 4
  assert "non-finite loss at step 5" in err and "Last good checkpoint: step 4" in err
  step, params = final_params(wd)
  assert step == 4
  import jax
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_sigterm_saves_the_step_it_stopped_at_then_the_run_resumes(tmp_path):
  """SIGTERM (a preemption) ends the step in flight: its metrics line, a checkpoint, exit 0; the
  same command resumes from there."""
  wd = tmp_path / "term"
  args = ["train", *SMALL, "checkpoint.every_steps=1000", "eval.every_steps=0", "--workdir", str(wd)]
  proc = subprocess.Popen([sys.executable, "-m", "omnimoe.train.cli", *args, "train.steps=100000"],
                          cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 300
  while not ((wd / "metrics.jsonl").is_file() and (wd / "metrics.jsonl").read_text()):
    assert proc.poll() is None and time.time() < deadline, "no step logged within 5 minutes"
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err
  stopped = [r["step"] for r in metrics(wd) if "loss" in r]
  assert stopped == list(range(1, stopped[-1] + 1))
  assert f"stopped at step {stopped[-1]} (SIGTERM)" in out
  assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == [stopped[-1]]
  resumed = run_cli(*args, f"train.steps={stopped[-1] + 2}")
  assert resumed.returncode == 0, resumed.stderr
  assert f"resumed from {wd / 'checkpoints' / str(stopped[-1])}" in resumed.stderr
  assert [r["step"] for r in metrics(wd) if "loss" in r] == list(range(1, stopped[-1] + 3))


def test_overrides_may_follow_options():
  from omnimoe.train.cli import _parse
  ns = _parse(["train", "configs/tiny.yaml", "--workdir", "runs/x", "train.steps=5", "model.num_layers=2"])
  assert ns.args == ["configs/tiny.yaml", "train.steps=5", "model.num_layers=2"]
  assert ns.workdir == "runs/x"
  ns = _parse(["prepare", "m.jsonl", "--out", "d", "--skip-bad", "data.image_side=16"])
  assert (ns.manifest, ns.out, ns.skip_bad, ns.args) == ("m.jsonl", "d", True, ["data.image_side=16"])
  with pytest.raises(SystemExit) as e:
    _parse(["train", "--workdir", "x", "stray", "--bogus"])
  assert e.value.code == 2


@pytest.mark.slow
def test_dynamic_router_run_logs_moe_telemetry_and_resumes(tmp_path, capsys):
  """Router "dynamic" through the real loop: telemetry per layer and modality in metrics.jsonl, the
  controller state saved in the checkpoint and resumed (eval uses it too)."""
  wd = tmp_path / "dyn"
  dyn = [*SMALL, "model.moe.router=dynamic", "model.moe.num_experts=8", "model.moe.k_max=3",
         "model.moe.threshold_rate=0.2", "checkpoint.every_steps=2", "eval.every_steps=0",
         "--workdir", str(wd)]
  assert main(["train", *dyn, "train.steps=2"]) == 0
  assert main(["train", *dyn, "train.steps=3"]) == 0
  capsys.readouterr()
  rows = [r for r in metrics(wd) if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3]
  for r in rows:
    for modality in ("text", "image", "audio"):
      if f"moe/active_fraction/{modality}" in r:
        load = r[f"moe/expert_load/{modality}/layer_0"]
        assert len(load) == 8 and abs(sum(load) - 1) < 1e-5
    assert {"moe/active_fraction", "moe/active_fraction/layer_0", "moe/router_entropy/layer_0",
            "moe/threshold/layer_0", "moe/expert_load/layer_0"} <= set(r)
    assert any(k.startswith("moe/active_fraction/") and k.count("/") == 2 and
               not k.endswith("layer_0") for k in r)
  # The threshold follows the controller across the resume (step 3 starts from step 2's update).
  t = [r["moe/threshold/layer_0"] for r in rows]
  f = [r["moe/active_fraction/layer_0"] for r in rows]
  for i in (0, 1):
    np.testing.assert_allclose(t[i + 1], t[i] * np.exp(0.2 * (0.125 - f[i]) / 0.125), rtol=1e-5)
  # Step 3 (the first after the resume) logged the active fractions a recount gives from
  # checkpoint 2 (parameters and thresholds) on the run's third batch.
  cfg = config_lib.load(wd / "config.yaml")
  mesh = make_mesh(cfg.mesh)
  setup = make_setup(cfg, mesh, data.dataset_info(cfg.data, cfg.train.seed))
  ckpts = Checkpoints(wd / "checkpoints", keep=cfg.checkpoint.keep, async_save=False)
  state, _ = ckpts.restore(2, setup)
  ckpts.close()
  np.testing.assert_allclose(state["router"]["threshold"], t[2], rtol=1e-6)
  it = data.train_iterator(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
  batch = [next(it) for _ in range(3)][-1]
  it.close()
  frac, by_modality = recount_active_fractions(cfg, setup, state, global_batch(batch, mesh))
  assert rows[2]["moe/active_fraction/layer_0"] == pytest.approx(frac[0], rel=1e-6)
  for m, modality in enumerate(("text", "image", "audio")):
    present = np.any((batch["modality"] == m + 1) & (batch["segment_ids"] > 0))
    assert (f"moe/active_fraction/{modality}" in rows[2]) == present, modality
    if present:
      assert rows[2][f"moe/active_fraction/{modality}"] == pytest.approx(by_modality[0, m], rel=1e-6)
  assert main(["eval", "--workdir", str(wd)]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["step"] == 3
  assert_eval_is_the_runs(result, wd)       # eval restores the thresholds as the run kept them

"""The train step, state creation and checkpoints, in-process on the 8 simulated devices."""
import pathlib

import jax
import numpy as np
import pytest

from omnimoe import data
from omnimoe.train import config as config_lib
from omnimoe.train.checkpoint import Checkpoints
from omnimoe.train import loop
from omnimoe.train.loop import _metrics_line
from omnimoe.train.mesh import batch_sharding, global_batch, make_mesh
from omnimoe.train.state import init_state, make_setup
from omnimoe.train.step import make_train_step
from oracles import recount_active_fractions

SMALL = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1",
         "model.head_dim=16", "model.rope_sections=[4,2,2]", "model.moe.num_experts=4",
         "model.moe.expert_hidden=32", "data.seq_len=64", "train.batch_size=8"]


def build(*overrides):
  cfg = config_lib.load(None, [*SMALL, *overrides])
  mesh = make_mesh()
  info = data.dataset_info(cfg.data, cfg.train.seed)
  setup = make_setup(cfg, mesh, info)
  return cfg, mesh, setup, init_state(cfg, setup)


def first_batch(cfg):
  return next(data.train_iterator(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed))


def test_state_is_created_sharded_on_the_mesh():
  cfg, mesh, setup, state = build()
  assert len(mesh.devices.flat) == 8
  for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(setup.shardings), strict=True):
    assert leaf.sharding == sharding
  assert int(state["step"]) == 0


def test_a_tiny_run_overfits_one_batch():
  cfg, mesh, setup, state = build("train.learning_rate=1e-2", "train.warmup_steps=5", "train.steps=100")
  step = make_train_step(cfg, setup, batch_sharding(mesh))
  batch = global_batch(first_batch(cfg), mesh)
  losses = []
  for _ in range(100):
    state, metrics = step(state, batch)
    losses.append(float(metrics["ce_loss"]))
  assert losses[0] > 3.0, losses[0]        # ~ln(vocab) at init
  assert losses[-1] < 0.15 * losses[0], (losses[0], losses[-1])


DYNAMIC = ["model.moe.router=dynamic", "model.moe.num_experts=8", "model.moe.k_max=3",
           "model.moe.target_active_fraction=0.125", "model.moe.threshold_rate=0.2"]


@pytest.mark.parametrize("router", [
    pytest.param([], id="topk"), pytest.param(DYNAMIC, id="dynamic"),
    pytest.param(["model.moe.bias_update_rate=0.01"], id="topk+bias", marks=pytest.mark.slow)])
def test_checkpoint_round_trip(tmp_path, router):
  cfg, mesh, setup, state = build(*router)
  assert ("router" in state) == bool(router)
  if "bias" in state.get("router", {}):
    assert state["router"]["bias"].shape == (1, 4, 4)   # text, image, audio, video
  step = make_train_step(cfg, setup, batch_sharding(mesh))
  it = data.train_iterator(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
  state, _ = step(state, global_batch(next(it), mesh))
  expected = jax.tree.map(np.asarray, state)
  ckpts = Checkpoints(tmp_path / "ckpt", keep=2, async_save=True)
  ckpts.save(1, state, it.get_state())
  ckpts.wait()
  restored, data_state = ckpts.restore(1, setup)
  ckpts.close()
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(restored), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))
  if "bias" in state.get("router", {}):        # the step moved it, and the checkpoint kept that
    assert np.abs(expected["router"]["bias"]).max() == pytest.approx(0.01)
  for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(setup.shardings), strict=True):
    assert leaf.sharding == sharding
  fresh = data.train_iterator(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
  fresh.set_state(data_state)
  np.testing.assert_array_equal(next(fresh)["tokens"], next(it)["tokens"])


def test_dynamic_router_state_is_advanced_by_the_step():
  """The step measures each layer's active fraction (equal to a recount from the layer's inputs)
  and moves its threshold toward the target by the controller's rule."""
  cfg, mesh, setup, state = build(*DYNAMIC, "model.num_layers=2")
  step = make_train_step(cfg, setup, batch_sharding(mesh))
  batch = global_batch(first_batch(cfg), mesh)
  before = np.asarray(state["router"]["threshold"])
  np.testing.assert_allclose(before, cfg.model.moe.threshold_init)
  frac, frac_by_modality = recount_active_fractions(cfg, setup, state, batch)  # before: donated
  assert len(np.unique(frac_by_modality)) > 1, "the modalities must route differently to tell"
  state, metrics = step(state, batch)
  np.testing.assert_allclose(metrics["active_fraction"], frac, rtol=1e-6)
  np.testing.assert_allclose(metrics["active_fraction_by_modality"], frac_by_modality, rtol=1e-6)
  after = np.asarray(state["router"]["threshold"])
  np.testing.assert_allclose(after, before * np.exp(0.2 * (0.125 - frac) / 0.125), rtol=1e-5)
  assert np.all(np.sign(after - before) == np.sign(0.125 - frac))
  np.testing.assert_allclose(metrics["router_threshold"], before)


def test_dynamic_router_controller_brings_the_active_fraction_to_its_target():
  """Training on fresh batches from threshold_init = 0.5 (about 0.29 of the experts active), the
  controller brings the measured fraction to the target 0.2 (measured: 0.19 on average over steps
  10-29, each step within 0.178-0.209); with threshold_rate=0 it stays near 0.29."""
  cfg, mesh, setup, state = build("model.moe.router=dynamic", "model.moe.num_experts=8",
                                  "model.moe.k_max=3", "model.moe.target_active_fraction=0.2",
                                  "model.moe.threshold_rate=0.2")
  step = make_train_step(cfg, setup, batch_sharding(mesh))
  it = data.train_iterator(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
  fractions = []
  for _ in range(30):
    state, metrics = step(state, global_batch(next(it), mesh))
    fractions.append(float(metrics["active_fraction"][0]))
  it.close()
  assert fractions[0] > 0.2 + 0.05, fractions[0]           # the controller had work to do
  assert np.mean(fractions[10:]) == pytest.approx(0.2, rel=0.1), fractions


@pytest.mark.slow
def test_dense_layers_shared_experts_and_dynamic_router_train_together():
  cfg, mesh, setup, state = build(*DYNAMIC, "model.num_layers=2", "model.num_dense_layers=1",
                                  "model.moe.num_shared_experts=1", "model.moe.bias_update_rate=1e-3")
  assert state["router"]["threshold"].shape == (1,)          # one MoE layer
  assert state["router"]["bias"].shape == (1, 4, 8)            # text, image, audio, video
  assert "mlp" in state["params"]["blocks"][0] and "shared" in state["params"]["blocks"][1]["moe"]
  step = make_train_step(cfg, setup, batch_sharding(mesh))
  state, metrics = step(state, global_batch(first_batch(cfg), mesh))
  line = _metrics_line(jax.device_get(metrics), tokens=512, seconds=1.0)
  assert "moe/expert_load/layer_1" in line and "moe/expert_load/layer_0" not in line
  assert "moe/threshold/layer_1" in line and np.isfinite(line["loss"])


def raw_metrics(loss=1.0):
  """What a step returns for 2 MoE layers (blocks 1 and 2) of E = 4 experts."""
  E = 4
  return {"loss": loss, "grad_norm": 2.0, "moe_layers": np.array([1, 2]),
          "expert_load": np.full((2, E), 0.25),
          "expert_load_by_modality": np.array([[[.5, .5, 0, 0], [0, 0, 0, 0], [0, 0, .5, .5],
                                                [0, 0, 0, 0]]] * 2),
          "active_fraction": np.array([0.25, 0.5]),
          "active_fraction_by_modality": np.array([[0.25, 0.0, 0.5, 0.0], [0.25, 0.0, 0.75, 0.0]]),
          "router_entropy": np.array([1.0, 1.2]),
          "router_entropy_by_modality": np.array([[1.0, 0.0, 1.1, 0.0], [1.2, 0.0, 1.3, 0.0]]),
          "dropped_fraction": np.array([0.0, 0.1])}


def test_metrics_line_per_layer_and_modality():
  line = _metrics_line(raw_metrics(), tokens=100, seconds=2.0)
  assert line["moe/dropped_fraction"] == pytest.approx(0.05)
  assert line["moe/dropped_fraction/layer_2"] == pytest.approx(0.1)
  assert line["tokens_per_s"] == 50 and line["loss"] == 1.0
  assert line["moe/active_fraction"] == pytest.approx(0.375)
  assert line["moe/active_fraction/text"] == pytest.approx(0.25)
  assert line["moe/active_fraction/audio"] == pytest.approx(0.625)
  assert line["moe/active_fraction/audio/layer_2"] == pytest.approx(0.75)
  assert "moe/active_fraction/image" not in line, "no image tokens: no key, not a misleading 0"
  assert list(line["moe/expert_load/audio/layer_1"]) == [0, 0, .5, .5]
  assert line["moe/router_entropy/text/layer_1"] == 1.0 and "moe/threshold" not in line


class Recorder:
  """Stands in for the metrics writer, the progress bar and the checkpoints."""
  def __init__(self):
    self.lines, self.waited = [], False
  def write(self, step, line):
    self.lines.append((step, line))
  update = write
  def wait(self):
    self.waited = True
  def latest_step(self):
    return 6


def test_step_metrics_are_fetched_one_step_late_and_stop_on_a_non_finite_loss(monkeypatch):
  cfg = config_lib.load(None, ["train.log_every=2", "train.steps=5", "train.batch_size=8",
                               "data.seq_len=64"])
  clock = iter([100, 110, 130, 160, 200, 250])       # what time.time() returns, call by call
  monkeypatch.setattr(loop.time, "time", lambda: next(clock))
  out = Recorder()
  # 2 GFLOP per token, 8 devices, a peak of 0.5 TFLOP/s per device
  metrics = loop._StepMetrics(cfg, 0, out, Recorder(), out, (2e9, 8, 0.5))  # opens at t = 100
  for step in (1, 2):
    metrics.hold(step, dict(raw_metrics(loss=float(step)), real_tokens=400 + step))
  assert out.lines == [], "step 2 stays on device until the next step is dispatched"
  metrics.hold(3, raw_metrics(loss=3.0))     # fetches step 2: logged at t = 110, window reopens
  assert [s for s, _ in out.lines] == [2] and metrics.last_loss == 2.0
  assert out.lines[0][1]["tokens_per_s"] == 2 * 8 * 64 / (110 - 100)
  assert out.lines[0][1]["real_tokens_per_s"] == (401 + 402) / (110 - 100)   # no padding counted
  assert out.lines[0][1]["tflops_per_device"] == pytest.approx(2e9 * 80.3 / 8 / 1e12)
  assert out.lines[0][1]["mfu"] == pytest.approx(2e9 * 80.3 / 8 / 1e12 / 0.5)
  assert "real_tokens" not in out.lines[0][1]
  metrics.restart_window(3)                  # a checkpoint at step 3 ends at t = 160
  metrics.hold(4, raw_metrics(loss=4.0))     # step 3 is fetched, not logged (log_every = 2)
  metrics.fetch()                            # step 4 logged at t = 200
  assert [s for s, _ in out.lines] == [2, 4]
  assert out.lines[1][1]["tokens_per_s"] == 1 * 8 * 64 / (200 - 160)
  assert out.lines[1][1]["real_tokens_per_s"] == 0, "steps 3-4 carried no real_tokens count"
  metrics.hold(5, raw_metrics(loss=float("nan")))
  with pytest.raises(loop.NonFiniteLoss, match="non-finite loss at step 5; stopped. Last good "
                                               "checkpoint: step 6"):
    metrics.fetch()
  assert out.waited, "the last good checkpoint is named once the pending saves are written"
  assert metrics.last_loss == 4.0


def test_processes_checking_one_workdir_at_once_do_not_trip_each_other(tmp_path):
  """The processes of a multi-host run check the same workdir at the same moment; with one shared
  probe file one of them could delete the other's and stop (its peer then hung at start-up)."""
  import subprocess
  import sys
  # Each process imports, says it is ready, waits for the other, then checks the workdir 2000
  # times, so that the two loops overlap.
  code = ("import pathlib, sys, time\nfrom omnimoe.train.loop import prepare_workdir\n"
          "run, me, other = sys.argv[1:]\n"
          "pathlib.Path(me).touch()\n"
          "while not pathlib.Path(other).exists(): time.sleep(0.001)\n"
          "for _ in range(2000):\n  prepare_workdir(run)\n")
  root = pathlib.Path(__file__).parent.parent
  ready = [str(tmp_path / "ready0"), str(tmp_path / "ready1")]
  procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run"), ready[i],
                             ready[1 - i]], cwd=root, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  errors = [p.communicate(timeout=120)[1] for p in procs]
  assert all(p.returncode == 0 for p in procs), errors
  assert list((tmp_path / "run").iterdir()) == []        # no probe left behind

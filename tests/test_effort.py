"""The inference-time compute dial (`omnimoe eval --effort`): top-k rebuilt with another k, dynamic
thresholds calibrated on held-out batches, and medium equal to plain eval (the oracle)."""
import functools
import json

import jax
import numpy as np
import pytest

from omnimoe import data
from omnimoe.train import config as config_lib, effort, loop
from omnimoe.train.checkpoint import Checkpoints
from omnimoe.train.cli import main
from omnimoe.train.mesh import make_mesh
from omnimoe.train.evaluate import load_eval_data
from omnimoe.train.state import init_state, make_setup
from oracles import active_fractions, dynamic_experts_taken, moe_inputs

# Two MoE layers of 8 experts; eval kept to one held-out batch and a few prompts.
SMALL = ["model.num_layers=2", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1",
         "model.head_dim=16", "model.rope_sections=[4,2,2]", "model.moe.num_experts=8",
         "model.moe.expert_hidden=32", "data.seq_len=64", "train.batch_size=8",
         "eval.batch_size=8", "eval.num_batches=1", "eval.image_limit=4", "eval.audio_limit=4",
         "eval.text_limit=1", "eval.max_new_tokens=2"]
DYNAMIC = ["model.moe.router=dynamic", "model.moe.k_max=3", "model.moe.target_active_fraction=0.125",
           "eval.num_batches=2"]


def checkpointed_run(workdir, *overrides, thresholds=None):
  """A run directory holding its config and a checkpoint of freshly initialised parameters (what
  is tested does not need trained ones); `thresholds` sets the dynamic router's per-layer state,
  so that a test can tell it was used. Returns the config."""
  cfg = config_lib.load(None, [*SMALL, *overrides])
  setup = make_setup(cfg, make_mesh(), data.dataset_info(cfg.data, cfg.train.seed))
  state = init_state(cfg, setup)
  if thresholds is not None:
    state["router"]["threshold"] = jax.device_put(np.asarray(thresholds, np.float32),
                                                  setup.shardings["router"]["threshold"])
  it = data.train_iterator(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
  ckpts = Checkpoints(workdir / "checkpoints", keep=1, async_save=False)
  ckpts.save(0, state, it.get_state())
  ckpts.close()
  it.close()
  (workdir / "config.yaml").write_text(config_lib.dump(cfg))
  return cfg


def recount(cfg, workdir, k_max: int, thresholds) -> tuple[float, np.ndarray]:
  """(active fraction, the same by modality [3]) of the checkpoint in `workdir` run with `k_max`
  and per-layer `thresholds` on the held-out batches eval uses: each MoE layer's share of experts
  over all their valid tokens, recounted by the float64 oracle from what the layer receives, then
  the mean over layers (the effort's definition, train/effort.py)."""
  setup, params, batches = _restored(cfg, workdir, k_max)
  router = {"threshold": np.asarray(thresholds, np.float32)}
  per_layer = {}                       # layer -> (taken, segment_ids, modality) of every batch
  for batch in batches:
    for m, (x, seg, mod, t) in enumerate(moe_inputs(setup.graphdef, params, batch, router)):
      router_DxE = np.asarray(params["blocks"][m]["moe"]["router_DxE"])
      taken = dynamic_experts_taken(x.reshape(-1, x.shape[-1]), router_DxE, float(t),
                                    cfg.model.moe.k_min, k_max)
      per_layer.setdefault(m, []).append((taken, seg.reshape(-1), mod.reshape(-1)))
  fracs = []
  for parts in per_layer.values():
    taken, seg, mod = (np.concatenate(a) for a in zip(*parts))
    fracs.append(active_fractions(taken, cfg.model.moe.num_experts, seg, mod))
  return float(np.mean([f for f, _ in fracs])), np.mean([b for _, b in fracs], axis=0)


@functools.cache
def _restored(cfg, workdir, k_max: int):
  """(setup of `cfg` with k_max, the checkpoint's parameters on it, the held-out mixed batches)."""
  variant = effort.with_moe(cfg, k_max=k_max)
  setup = make_setup(variant, make_mesh(variant.mesh), data.dataset_info(cfg.data, cfg.train.seed))
  ckpts = Checkpoints(workdir / "checkpoints", keep=1, async_save=False)
  params = ckpts.restore(0, setup)[0]["params"]
  ckpts.close()
  return setup, params, load_eval_data(cfg).mixed


def test_effort_names_and_fractions():
  cfg = config_lib.load(None, [*SMALL, "model.moe.top_k=2"])
  assert effort.trained_fraction(cfg) == 0.25
  got = [(e.label, e.fraction, e.as_trained)
         for e in effort.resolve(effort.parse_efforts("low, medium,high,0.3"), cfg)]
  assert got == [("low", 0.125, False), ("medium", 0.25, True), ("high", 0.5, False),
                 ("0.3", 0.3, False)]
  dyn = config_lib.load(None, [*SMALL, *DYNAMIC])
  assert [e.fraction for e in effort.resolve(["low", "high"], dyn)] == [0.0625, 0.25]
  assert [effort.top_k_for(f, 8) for f in (0.01, 0.125, 0.1875, 0.3, 0.5, 1.0)] == [1, 1, 2, 2, 4, 8]
  for bad in ("", "huge", "0", "1.5", "low,low"):
    with pytest.raises(config_lib.ConfigError):
      effort.parse_efforts(bad)


def test_calibration_settles_layers_that_depend_on_the_layers_below():
  """A synthetic model: layer i's fraction rises with its own threshold and shifts with layer
  i-1's, as routing does through the residual stream."""
  def measure_layers(t):
    f = np.empty_like(t)
    for i, ti in enumerate(t):
      shift = 0.0 if i == 0 else 0.3 * (t[i - 1] - 0.5)
      f[i] = np.clip(0.125 + 0.5 * (ti + shift) ** 2, 0.125, 0.5)
    return f

  start = np.full(4, 0.5)
  assert np.all(np.abs(measure_layers(start) - 0.3) > 0.01)
  thresholds = effort.calibrate_thresholds(measure_layers, start, 0.3)
  np.testing.assert_allclose(measure_layers(thresholds), 0.3, rtol=0.01)


@pytest.mark.slow   # end to end: compiles eval for several graphs
def test_topk_efforts_change_k_and_medium_equals_plain_eval(tmp_path, capsys):
  cfg = checkpointed_run(tmp_path, "model.moe.top_k=2")
  assert main(["eval", "--workdir", str(tmp_path), "--effort", "low,medium,high"]) == 0
  out = capsys.readouterr()
  result = json.loads(out.out)
  assert result["step"] == 0 and result["router"] == "topk"
  assert result["trained_active_fraction"] == 0.25
  runs = result["efforts"]
  assert [runs[e]["top_k"] for e in ("low", "medium", "high")] == [1, 2, 4]
  for name, k in (("low", 1), ("medium", 2), ("high", 4)):
    assert runs[name]["requested_fraction"] == k / 8
    assert runs[name]["active_fraction"] == k / 8            # exactly: every token takes k
    assert "active_fraction/text" in runs[name]
    for m in ("text", "image", "audio"):
      if f"active_fraction/{m}" in runs[name]:
        assert runs[name][f"active_fraction/{m}"] == k / 8
    assert f"effort {name}: active fraction {k / 8:.4f}" in out.err
  # The oracle: medium is the model as trained, so it must give plain eval's numbers exactly.
  step, plain, _ = loop.evaluate(cfg, tmp_path)
  assert step == 0 and "eval/loss" in plain
  for key, value in plain.items():
    assert runs["medium"][key] == value, key
  # Another k: the same parameters in another graph give another loss.
  assert runs["low"]["eval/loss"] != plain["eval/loss"] != runs["high"]["eval/loss"]


@pytest.mark.slow   # end to end: compiles eval for several graphs
def test_dynamic_thresholds_are_calibrated_and_medium_keeps_the_trained_ones(tmp_path):
  trained = [0.3, 0.45]
  cfg = checkpointed_run(tmp_path, *DYNAMIC, thresholds=trained)
  result = effort.evaluate_efforts(cfg, tmp_path, ["low", "medium", "0.2", "high"])
  runs = result["efforts"]
  assert result["trained_active_fraction"] == 0.125
  # high = 2 * 0.125: k_max raised from 3 to ceil(2 * 0.25 * 8) = 4 to reach it.
  assert runs["high"]["k_max"] == 4 and runs["0.2"]["k_max"] == 4
  # Each level's fraction, recounted by the float64 oracle at its thresholds and k_max: what the
  # effort reports, and within the calibration's 1% of what the level asks for.
  for name, f in (("0.2", 0.2), ("high", 0.25), ("medium", None)):
    frac, by_modality = recount(cfg, tmp_path, runs[name]["k_max"], runs[name]["threshold"])
    assert runs[name]["active_fraction"] == pytest.approx(frac, rel=1e-6), name
    for m, modality in enumerate(("text", "image", "audio")):
      assert runs[name][f"active_fraction/{modality}"] == pytest.approx(by_modality[m], rel=1e-6)
    if f is not None:
      assert abs(frac - f) <= 0.01 * f, (name, frac)
  assert np.all(np.array(runs["0.2"]["threshold"]) < np.array(runs["high"]["threshold"]))
  assert runs["0.2"]["eval/loss"] != runs["high"]["eval/loss"]
  # low = 0.0625 is below k_min / E = 0.125: thresholds 0, every token takes exactly one expert.
  assert runs["low"]["threshold"] == [0.0, 0.0] and runs["low"]["k_max"] == 3
  assert runs["low"]["active_fraction"] == 0.125
  assert any("effort low" in n and "below k_min/num_experts" in n for n in result["notes"])
  # medium: the checkpoint's thresholds and k_max, so exactly plain eval.
  medium = runs["medium"]
  assert medium["k_max"] == 3 and medium["threshold"] == pytest.approx(trained)
  _, plain, _ = loop.evaluate(cfg, tmp_path)
  for key, value in plain.items():
    assert medium[key] == value, key


def test_bad_effort_is_one_line_exit_2(tmp_path, capsys):
  assert main(["eval", "--workdir", str(tmp_path), "--effort", "lowest"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "--effort item 'lowest'" in err

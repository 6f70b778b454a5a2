"""Held-out loss per source: `eval/loss/source/<label>` next to `eval/loss` and its modalities."""
import dataclasses
import json
import math

import numpy as np
import pytest

from omnimoe import data
from omnimoe.data.prepare import write as prepare
from omnimoe.data.pipeline import sources
from omnimoe.data.config import DataConfig, Source
from omnimoe.data.builtin.demo_files import write_demo
from omnimoe.train import config as config_lib
from omnimoe.train.cli import main

SMALL = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1",
         "model.head_dim=16", "model.rope_sections=[4,2,2]", "model.moe.num_experts=4",
         "model.moe.expert_hidden=32", "data.seq_len=64", "train.batch_size=8", "train.steps=2",
         "train.log_every=1", "eval.every_steps=0", "eval.batch_size=8", "eval.num_batches=2",
         "eval.image_limit=4", "eval.audio_limit=4", "eval.text_limit=1", "eval.max_new_tokens=2",
         "data.prefetch=0"]


def test_labels_are_basenames_or_default_and_unique():
  def labels(*paths, weights=None):
    weights = weights or [1.0] * len(paths)
    return sources.labels(DataConfig(sources=tuple(Source(p, w) for p, w in zip(paths, weights))))
  assert labels() == ["default"] and labels("default") == ["default"]
  assert labels("runs/mydata/", "default", "/abs/other") == ["mydata", "default", "other"]
  assert labels("a/prep", "b/prep", "c/x") == ["prep_0", "prep_1", "x"]
  assert labels("a/prep", "b/prep", "c/x", weights=[1.0, 0.0, 1.0]) == ["prep", "x"]   # weight 0: out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  folder = tmp_path_factory.mktemp("demo")
  manifest = write_demo(folder / "files", examples=30)
  prepare.prepare(manifest, folder / "mydemo", DataConfig(seq_len=64))
  return folder / "mydemo"


def test_by_source_batches_are_eval_batches_grouped(demo):
  cfg = DataConfig(seq_len=64, prefetch=0, sources=(Source(str(demo)), Source("default", 2.0)))
  grouped = data.eval_batches_by_source(cfg, batch_size=4, seed=0, num_batches=2)
  flat = data.eval_batches(cfg, batch_size=4, seed=0, num_batches=2)
  assert [label for label, _ in grouped] == ["mydemo", "default"]
  together = [b for _, batches in grouped for b in batches]
  assert len(together) == len(flat)
  for x, y in zip(together, flat):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  only_default = data.eval_batches_by_source(DataConfig(seq_len=64), batch_size=4, seed=0,
                                             num_batches=1)
  assert [label for label, _ in only_default] == ["default"]


@pytest.mark.slow
def test_a_mixed_run_reports_loss_per_source_that_adds_up(demo, tmp_path):
  mix = f"data.sources=[{{path: {demo}, weight: 1.0}}, {{path: default, weight: 1.0}}]"
  wd = tmp_path / "run"
  assert main(["train", *SMALL, mix, "--workdir", str(wd)]) == 0
  rows = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  final = [r for r in rows if "eval/loss" in r][-1]
  for key in ("eval/loss", "eval/loss/text", "eval/loss/source/mydemo", "eval/loss/source/default",
              "eval/text_bits_per_byte"):
    assert key in final and math.isfinite(final[key]), (key, sorted(final))
  assert sorted(k for k in final if k.startswith("eval/loss/source/")) == [
      "eval/loss/source/default", "eval/loss/source/mydemo"]

  # Oracle: each source's held-out target count, counted here from its own batches, weighs its
  # loss; the weighted mean is the overall eval/loss.
  cfg = config_lib.load(None, [*SMALL, mix])
  unit = dataclasses.replace(cfg.data, loss_weight_text=1.0, loss_weight_image=1.0,
                             loss_weight_audio=1.0)
  weights = {label: float(sum(b["loss_weights"].sum() for b in batches))
             for label, batches in data.eval_batches_by_source(
                 unit, batch_size=cfg.eval.batch_size, seed=cfg.train.seed,
                 num_batches=cfg.eval.num_batches)}
  assert set(weights) == {"mydemo", "default"} and min(weights.values()) > 0
  combined = sum(w * final[f"eval/loss/source/{label}"] for label, w in weights.items())
  combined /= sum(weights.values())
  assert combined == pytest.approx(final["eval/loss"], rel=1e-6)
  # The two sources differ, so the overall loss lies strictly between them.
  lo, hi = sorted(final[f"eval/loss/source/{label}"] for label in weights)
  assert lo < final["eval/loss"] < hi

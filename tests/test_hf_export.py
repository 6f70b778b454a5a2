"""`omnimoe export-hf`: import -> export leaves every weight bit-identical; a model trained a few
steps in omnimoe, exported, is the same function in transformers; settings with no Qwen3-MoE
equivalent are refused, named."""
import json
import pathlib

import numpy as np
import pytest
from safetensors import safe_open

import hf_tiny
from omnimoe.train import config as config_lib
from omnimoe.train.cli import main


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """(the transformers model, its folder, the omnimoe run folder imported from it)."""
  root = tmp_path_factory.mktemp("hf")
  model = hf_tiny.write(root / "tiny", max_shard_size="100KB")
  assert main(["import-hf", str(root / "tiny"), "--out", str(root / "run")]) == 0
  return model, root / "tiny", root / "run"


def tensors(folder: pathlib.Path) -> dict[str, tuple[str, bytes]]:
  """{name: (safetensors dtype, raw bytes)} of every tensor of a folder."""
  out = {}
  for shard in folder.glob("*.safetensors"):
    with safe_open(str(shard), framework="numpy") as f:
      for name in f.keys():
        out[name] = (f.get_slice(name).get_dtype(),
                     np.ascontiguousarray(f.get_tensor(name)).tobytes())
  return out


def test_import_then_export_is_bit_identical(imported, tmp_path):
  model, source, run = imported
  out = tmp_path / "back"
  assert main(["export-hf", "--workdir", str(run), "--out", str(out), "--dtype", "float32"]) == 0
  want, got = tensors(source), tensors(out)
  assert sorted(got) == sorted(want)
  different = [n for n in want if got[n] != want[n]]
  assert not different, different[:5]
  config = json.loads((out / "config.json").read_text())
  assert config["mlp_only_layers"] == [0] and config["head_dim"] == 12
  ids = np.random.default_rng(1).integers(0, hf_tiny.VOCAB, (2, 16))
  np.testing.assert_array_equal(hf_tiny.logits(hf_tiny.load(out), ids), hf_tiny.logits(model, ids))


def test_bfloat16_checkpoint_round_trips_bit_identical_by_default(tmp_path):
  """The released checkpoints' dtype: imported into float32 (exact), exported as bfloat16, the
  default."""
  hf_tiny.write(tmp_path / "tiny", dtype="bfloat16")
  assert main(["import-hf", str(tmp_path / "tiny"), "--out", str(tmp_path / "run")]) == 0
  out = tmp_path / "bf16"
  assert main(["export-hf", "--workdir", str(tmp_path / "run"), "--out", str(out)]) == 0
  want, got = tensors(tmp_path / "tiny"), tensors(out)
  assert {dtype for dtype, _ in got.values()} == {"BF16"}
  assert sorted(got) == sorted(want) and all(got[n] == want[n] for n in want)
  assert "bfloat16" in (out / "config.json").read_text()
  assert hf_tiny.load(out) is not None     # transformers reads it


@pytest.mark.parametrize("override, words", [
    ("model.moe.router=dynamic", "model.moe.router=dynamic has no Qwen3-MoE equivalent"),
    ("model.moe.num_shared_experts=1", "model.moe.num_shared_experts=1 has no Qwen3-MoE"),
    ("model.moe.max_groups=1", "model.moe.max_groups=1 has no Qwen3-MoE equivalent"),
    ("model.qk_norm=false", "model.qk_norm=false has no Qwen3-MoE equivalent"),
])
def test_settings_without_an_equivalent_are_refused(tmp_path, capsys, override, words):
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.yaml").write_text(config_lib.dump(config_lib.load(None, [override])))
  out = tmp_path / "hf"
  assert main(["export-hf", "--workdir", str(run), "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and words in err, err
  assert not out.exists()


@pytest.mark.slow
def test_trained_model_exports_to_the_same_function(imported, tmp_path):
  """A few `omnimoe train` steps on the default data from the imported checkpoint, exported:
  transformers' logits are omnimoe's."""
  import shutil
  _, _, imported_run = imported
  run = tmp_path / "run"
  shutil.copytree(imported_run, run)
  before = hf_tiny.omnimoe_logits(run, np.zeros((8, 4), np.int64))
  assert main(["train", str(run / "config.yaml"), "--workdir", str(run), "train.steps=3",
               "train.batch_size=8", "data.seq_len=64", "train.warmup_steps=1",
               "eval.every_steps=0", "eval.batch_size=8", "eval.num_batches=1",
               "eval.image_limit=8", "eval.audio_limit=8", "eval.text_limit=2"]) == 0
  assert (run / "checkpoints" / "3").is_dir()
  ids = np.random.default_rng(2).integers(0, hf_tiny.VOCAB, (8, 24))
  trained = hf_tiny.omnimoe_logits(run, ids)
  assert np.abs(hf_tiny.omnimoe_logits(run, np.zeros((8, 4), np.int64)) - before).max() > 1e-3
  out = tmp_path / "hf"
  assert main(["export-hf", "--workdir", str(run), "--out", str(out), "--dtype", "float32"]) == 0
  np.testing.assert_allclose(hf_tiny.logits(hf_tiny.load(out), ids), trained, atol=1e-4, rtol=1e-4)

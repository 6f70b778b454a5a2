"""`omnimoe import-hf`: a Qwen3-MoE that transformers wrote and runs (tests/hf_tiny.py) is, once
imported, the same function in omnimoe; bad folders are refused in one line with nothing written."""
import json
import pathlib
import shutil

import numpy as np
import pytest

import hf_tiny
from omnimoe.train import config as config_lib
from omnimoe.train.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(the transformers model, its folder: three shards and an index)."""
  folder = tmp_path_factory.mktemp("hf") / "tiny"
  model = hf_tiny.write(folder, max_shard_size="100KB")
  assert (folder / "model.safetensors.index.json").is_file()
  assert len(list(folder.glob("*.safetensors"))) >= 2
  return model, folder


def test_imported_model_is_the_same_function(tiny, tmp_path):
  model, folder = tiny
  out = tmp_path / "run"
  assert main(["import-hf", str(folder), "--out", str(out)]) == 0
  resolved = config_lib.to_dict(config_lib.load(out / "config.yaml"))
  for key, value in hf_tiny.OMNIMOE_KEYS.items():
    section, *rest = key.split(".")
    got = resolved[section]
    for part in rest:
      got = got[part]
    assert got == value, key
  assert json.loads((out / "hf_import.json").read_text())["vocab_size"] == hf_tiny.VOCAB
  ids = np.random.default_rng(0).integers(0, hf_tiny.VOCAB, (8, 24))
  want = hf_tiny.logits(model, ids)
  got = hf_tiny.omnimoe_logits(out, ids)
  assert np.abs(want).max() > 1.0            # logits of a model whose every part matters
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def _edit_config(folder: pathlib.Path, **changes) -> None:
  path = folder / "config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _drop_shard(folder: pathlib.Path) -> str:
  shard = sorted(folder.glob("*.safetensors"))[-1]
  shard.unlink()
  return shard.name


@pytest.mark.parametrize("damage, code, words", [
    (lambda f: _edit_config(f, model_type="llama", architectures=["LlamaForCausalLM"]), 2,
     ["config.json", "'llama' is not Qwen3-MoE"]),
    (lambda f: _edit_config(f, norm_topk_prob=False), 2, ["norm_topk_prob: false"]),
    (lambda f: _edit_config(f, tie_word_embeddings=True), 2, ["tie_word_embeddings: true"]),
    (lambda f: _edit_config(f, mlp_only_layers=[1]), 2, ["mlp_only_layers [1]", "not a prefix"]),
    (lambda f: _edit_config(f, rms_norm_eps=1e-5), 2, ["rms_norm_eps 1e-05"]),
    (lambda f: _edit_config(f, rope_parameters={"rope_type": "yarn", "rope_theta": 1e3,
                                                "factor": 4.0}), 2, ["rope_type 'yarn'"]),
    (_drop_shard, 3, ["missing (listed in", "model.safetensors.index.json"]),
    (lambda f: _edit_config(f, moe_intermediate_size=20), 3,
     ["model.layers.1.mlp.experts.0.gate_proj.weight has shape [16, 32]",
      "config.json implies [20, 32]"]),
])
def test_bad_folders_are_refused_in_one_line(tiny, tmp_path, capsys, damage, code, words):
  folder = tmp_path / "hf"
  shutil.copytree(tiny[1], folder)
  named = damage(folder)
  out = tmp_path / "run"
  assert main(["import-hf", str(folder), "--out", str(out)]) == code
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  for w in [*words, *([named] if named else [])]:
    assert w in err, err
  assert not out.exists()


def test_model_keys_cannot_be_overridden_and_out_must_be_new(tiny, tmp_path, capsys):
  folder = tiny[1]
  assert main(["import-hf", str(folder), "--out", str(tmp_path / "a"), "model.d_model=64"]) == 2
  assert "model.d_model is set by" in capsys.readouterr().err
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "keep.txt").write_text("mine")
  assert main(["import-hf", str(folder), "--out", str(busy)]) == 2
  assert "exists and is not an empty folder" in capsys.readouterr().err
  assert [p.name for p in busy.iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_import_onto_a_sharded_mesh_is_the_same_function(tiny, tmp_path):
  """Parameters placed straight into fsdp- and expert-sharded layouts (8 devices: fsdp 2 x
  expert 4): restored onto that mesh, still transformers' function."""
  model, folder = tiny
  out = tmp_path / "run"
  assert main(["import-hf", str(folder), "--out", str(out), "mesh.within_rack.fsdp=2",
               "mesh.within_rack.expert=4", "mesh.within_rack.data=1"]) == 0
  ids = np.random.default_rng(4).integers(0, hf_tiny.VOCAB, (8, 24))
  np.testing.assert_allclose(hf_tiny.omnimoe_logits(out, ids), hf_tiny.logits(model, ids),
                             atol=1e-4, rtol=1e-4)

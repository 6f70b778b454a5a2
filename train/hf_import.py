"""`omnimoe import-hf HF_DIR --out DIR [CONFIG] [key=value ...]`: a Hugging Face Qwen3-MoE folder
(config.json and `*.safetensors`, with or without `model.safetensors.index.json`) -> an omnimoe
run folder: `DIR/config.yaml` (CONFIG and the overrides, with the model keys config.json implies:
train/hf_config.py, and `data.tokenizer` = HF_DIR/tokenizer.json when there is one and no other
tokenizer was asked for), `DIR/hf_import.json` (where it came from, its vocabulary size and config.json)
and an orbax checkpoint at step 0, `DIR/checkpoints/0` (the train state without the optimizer's,
which restoring starts afresh, and without data iterator state), that `omnimoe train --init-from`
grows to a run's vocabulary, and `omnimoe train`/`eval` restore directly when the run's vocabulary
is the checkpoint's size.

Everything is checked before anything is written: the config, that every tensor the model needs is
in a shard that exists, with the shape config.json implies, and that no tensor is left over. Then
the tensors are read one at a time (`safetensors`, numpy; no torch), converted (train/hf_names.py)
and placed straight into their shardings on the run's mesh (`mesh.*` keys), so the host holds one
omnimoe parameter at a time besides what the devices hold.

The embedding and the head hold the Hugging Face vocabulary as it is (row i is token id i), the
media embedders are initialised as a new run's are (`train.seed`). Errors: HfError (one line,
exit 2: not a Qwen3-MoE, an option omnimoe cannot express, a bad --out) or HfDataError (exit 3: a
missing or unreadable shard, a missing, extra or misshapen tensor).
"""
import json
import pathlib
import shutil
import types

import numpy as np

from omnimoe.train import hf_config, hf_names
from omnimoe.train.hf_config import HfError

INDEX = "model.safetensors.index.json"
RECORD = "hf_import.json"     # in the run folder: what was imported


class HfDataError(HfError):
  """A missing or damaged file or tensor of the Hugging Face folder (exit 3)."""


def _open(path: pathlib.Path):
  from safetensors import safe_open
  try:
    return safe_open(str(path), framework="numpy")
  except Exception as e:   # safetensors raises its own error types for a damaged header
    raise HfDataError(f"{path}: not a readable safetensors file ({e})") from None


def locate(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  """{tensor name: the shard holding it}, from the index when there is one, else from every
  `*.safetensors` file's header."""
  folder = pathlib.Path(folder)
  index = folder / INDEX
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise HfDataError(f"{index}: not a safetensors index ({e!r})") from None
    where = {name: folder / shard for name, shard in weight_map.items()}
    for shard in sorted(set(where.values())):
      if not shard.is_file():
        raise HfDataError(f"{shard}: missing (listed in {index})")
    return where
  shards = sorted(folder.glob("*.safetensors"))
  if not shards:
    raise HfDataError(f"{folder}: no *.safetensors file")
  where = {}
  for shard in shards:
    with _open(shard) as f:
      where.update({name: shard for name in f.keys()})
  return where


def check_tensors(weights: list, where: dict[str, pathlib.Path]) -> None:
  """Every tensor the model needs is where the index says, with its shape; none is left over."""
  wanted = {n: s for w in weights for n, s in zip(w.names, w.shapes)}
  extra = sorted(set(where) - set(wanted))
  if extra:
    raise HfDataError(f"{where[extra[0]]}: tensor {extra[0]} is not part of a Qwen3-MoE that "
                      f"omnimoe can express ({len(extra)} such tensors)")
  by_shard: dict[pathlib.Path, list[str]] = {}
  for name in wanted:
    if name not in where:
      raise HfDataError(f"tensor {name} is missing from the Hugging Face folder")
    by_shard.setdefault(where[name], []).append(name)
  for shard, names in by_shard.items():
    with _open(shard) as f:
      present = set(f.keys())
      for name in names:
        if name not in present:
          raise HfDataError(f"{shard}: tensor {name} is missing (the index places it there)")
        shape = tuple(f.get_slice(name).get_shape())
        if shape != wanted[name]:
          raise HfDataError(f"{shard}: tensor {name} has shape {list(shape)} but config.json "
                            f"implies {list(wanted[name])}")


def _read(where: dict, names: tuple[str, ...]) -> list[np.ndarray]:
  out = []
  for name in names:
    with _open(where[name]) as f:
      try:
        out.append(np.asarray(f.get_tensor(name), np.float32))
      except Exception as e:
        raise HfDataError(f"{where[name]}: tensor {name} is not readable ({e})") from None
  return out


def resolve_config(hf: dict, config_path: str | None, overrides: list[str], where: str):
  """The run's Config: CONFIG and the overrides, then the model keys of config.json (an override
  of one of those is refused: the checkpoint decides it)."""
  from omnimoe.train import config as config_lib
  keys = hf_config.model_keys(hf, where)
  for text in overrides:
    key = config_lib.parse_override(text)[0]
    if key in keys:
      raise HfError(f"{key} is set by {where}; drop the override '{text}'")
  cfg = config_lib.load(config_path, [*overrides, *(f"{k}={json.dumps(v)}" for k, v in keys.items())])
  tokenizer = pathlib.Path(where).parent / "tokenizer.json"
  if not cfg.data.tokenizer and tokenizer.is_file():   # the model's own, for `train --init-from`
    cfg = config_lib.load(config_path, [*overrides, f"data.tokenizer={json.dumps(str(tokenizer))}",
                                        *(f"{k}={json.dumps(v)}" for k, v in keys.items())])
  if cfg.model.scan_layers:
    raise HfError("model.scan_layers=true: import-hf writes unrolled layers; import without it")
  return cfg


def new_out(out: pathlib.Path) -> None:
  """Refuses an --out that exists and is not an empty folder."""
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise HfError(f"--out {out}: exists and is not an empty folder; give a new one")


def undo(out: pathlib.Path, created: bool) -> None:
  """Removes what a failed conversion wrote into `out` (the folder too when it made it)."""
  if created:
    shutil.rmtree(out, ignore_errors=True)
    return
  for path in out.iterdir():
    if path.is_dir():
      shutil.rmtree(path)
    else:
      path.unlink()


def import_hf(hf_dir: str, out: str, config_path: str | None = None,
              overrides: list[str] = ()) -> dict:
  """Converts the folder; returns what was written (the record of hf_import.json)."""
  folder, out = pathlib.Path(hf_dir).absolute(), pathlib.Path(out).absolute()
  hf = hf_config.read_config(folder)
  cfg = resolve_config(hf, config_path, list(overrides), str(folder / "config.json"))
  weights = hf_names.weights(cfg.model, hf["vocab_size"])
  where = locate(folder)
  check_tensors(weights, where)
  new_out(out)
  created = not out.exists()
  out.mkdir(parents=True, exist_ok=True)
  try:
    return _write(cfg, hf, folder, out, weights, where)
  except BaseException:
    undo(out, created)
    raise


def _write(cfg, hf: dict, folder: pathlib.Path, out: pathlib.Path, weights: list, where: dict):
  import jax
  from omnimoe.data.config import feature_dim
  from omnimoe.train import config as config_lib
  from omnimoe.train.checkpoint import Checkpoints
  from omnimoe.train.mesh import make_mesh
  from omnimoe.train.state import init_state, make_setup
  vocab = hf["vocab_size"]
  info = types.SimpleNamespace(vocab=types.SimpleNamespace(size=vocab), feature_dim=feature_dim(cfg.data))
  setup = make_setup(cfg, make_mesh(cfg.mesh), info)
  state = init_state(cfg, setup, optimizer=False)   # the media embedders, sharded
  for w in weights:
    array = w.to_omnimoe(_read(where, w.names))
    old = hf_names.get(state["params"], w.path)
    assert array.shape == old.shape and array.dtype == old.dtype, (w.path, array.shape, old.shape)
    # Each device (on every host) takes its slice of the one array read: the host holds one
    # parameter, never the model.
    new = jax.make_array_from_callback(array.shape, old.sharding, lambda index: array[index])
    hf_names.put(state["params"], w.path, new)
    old.delete()
  ckpts = Checkpoints(out / "checkpoints", keep=cfg.checkpoint.keep, async_save=False)
  ckpts.save(0, state, None)
  ckpts.close()
  (out / "config.yaml").write_text(config_lib.dump(cfg))
  record = {"source": str(folder), "vocab_size": vocab, "tensors": len(where),
            "parameters": int(sum(np.prod(s) for w in weights for s in w.shapes)),
            "config": hf}
  (out / RECORD).write_text(json.dumps(record, indent=1))
  return record


def describe(record: dict, out: str) -> str:
  return (f"imported {record['source']} ({record['parameters']:,} parameters in "
          f"{record['tensors']} tensors, vocabulary {record['vocab_size']}) into {out}: "
          f"config.yaml, checkpoints/0")

"""`train.init_from` (`omnimoe train --init-from DIR`): a new run starts from the weights of an
`omnimoe import-hf` folder, grown to the run's vocabulary, with a fresh optimizer at step 0.

The run's model keys that config.json decides must be the folder's (train/hf_config.py
`model_keys`; the others, such as `model.remat` or the dispatch, are the run's), and its text
tokenizer must hold the imported vocabulary: `data.tokenizer=HF_DIR/tokenizer.json`
(data/hf_tokenizer.py) gives text ids = Hugging Face ids, so Hugging Face id i, row i of the
imported embedding and column i of its head, becomes omnimoe id `text_offset + i` (4: after the
specials PAD, BOS, EOS and one reserved id, data/vocab.py).

The rows with no imported counterpart (the specials, the image and audio codes, the padding rows up
to a multiple of 128) keep the run's own random draw, rescaled to the standard deviation of the
imported rows (the embedding's rows and the head's columns each to their own), so a new id starts
at the scale of the known ones. The media embedders are the run's own. Every other parameter is the
import's. The run folder gets an hf_import.json with the text offset, so that `omnimoe export-hf`
writes the text rows back at their Hugging Face ids.
"""
import json
import pathlib

import numpy as np

from omnimoe.train import hf_config, hf_names
from omnimoe.train.config import ConfigError
from omnimoe.train.hf_export import blocks_by_int, latest_params, unroll
from omnimoe.train.hf_import import RECORD

VOCAB_AXIS = {("embed", "table_VxD"): 0, ("head_DxV",): 1}


def _source(folder: pathlib.Path) -> dict:
  path = folder / RECORD
  if not path.is_file():
    raise ConfigError(f"train.init_from '{folder}' is not a folder of `omnimoe import-hf` (no {RECORD})")
  return json.loads(path.read_text())


def _check_model(cfg, record: dict, folder: pathlib.Path) -> None:
  from omnimoe.train import config as config_lib
  tree = config_lib.to_dict(cfg)
  for key, want in hf_config.model_keys(record["config"]).items():
    got = tree
    for part in key.split("."):
      got = got[part]
    if (list(got) if isinstance(got, tuple) else got) != (list(want) if isinstance(want, tuple) else want):
      raise ConfigError(f"config key '{key}' is {got} but train.init_from '{folder}' has {want}; "
                        f"start from its config.yaml")
  if cfg.model.scan_layers:
    raise ConfigError("model.scan_layers=true with train.init_from: the imported layers are unrolled; "
                      "set model.scan_layers=false")


def grown(fresh: np.ndarray, imported: np.ndarray, rows: np.ndarray, axis: int) -> np.ndarray:
  """`fresh` with the imported slices placed at `rows` along `axis`; the other slices rescaled to
  the imported slices' standard deviation."""
  out = np.array(fresh, np.float32)
  others = np.setdiff1d(np.arange(fresh.shape[axis]), rows)
  scale = float(np.std(imported)) / max(float(np.std(np.take(fresh, others, axis=axis))), 1e-12)
  index = [slice(None)] * fresh.ndim
  index[axis] = others
  out[tuple(index)] *= scale
  index[axis] = rows
  out[tuple(index)] = imported
  return out


def grow(state: dict, cfg, vocab, workdir: pathlib.Path) -> dict:
  """The run's freshly initialised state with the imported weights in place (jax arrays in the
  state's shardings); writes `workdir/hf_import.json`."""
  import jax
  folder = pathlib.Path(cfg.train.init_from).absolute()
  record = _source(folder)
  _check_model(cfg, record, folder)
  V = record["vocab_size"]
  if vocab.text_tokens != V:
    raise ConfigError(f"train.init_from '{folder}' holds {V} Hugging Face ids but this run's text "
                      f"has {vocab.text_tokens} (data.tokenizer='{cfg.data.tokenizer}'); set "
                      "data.tokenizer to the model's tokenizer.json")
  _, params = latest_params(folder)
  params = blocks_by_int(unroll(params, cfg.model.num_dense_layers))
  source_rows = np.arange(V) + record.get("text_offset", 0)
  rows = np.arange(V) + vocab.text_offset
  for w in hf_names.weights(cfg.model, V):
    old = hf_names.get(state["params"], w.path)
    array = np.asarray(hf_names.get(params, w.path), np.float32)
    if w.path in VOCAB_AXIS:
      axis = VOCAB_AXIS[w.path]
      array = grown(np.asarray(old), np.take(array, source_rows, axis=axis), rows, axis)
    if array.shape != old.shape:
      raise ConfigError(f"train.init_from '{folder}': parameter {'/'.join(map(str, w.path))} has "
                        f"shape {list(array.shape)}, this run's {list(old.shape)}")
    hf_names.put(state["params"], w.path,
                 jax.make_array_from_callback(array.shape, old.sharding, lambda i, a=array: a[i]))
  if jax.process_index() == 0:
    (workdir / RECORD).write_text(json.dumps(
        {**record, "text_offset": vocab.text_offset, "init_from": str(folder)}, indent=1))
  return state

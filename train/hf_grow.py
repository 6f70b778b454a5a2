"""`train.init_from` (`omnimoe train --init-from DIR`): a new run starts from the weights of an
`omnimoe import-hf` folder, grown to the run's vocabulary, with a fresh optimizer at step 0.

The run's model keys that config.json decides must be the folder's (train/hf_config.py
`model_keys`; the others, such as `model.remat` or the dispatch, are the run's), and its text
tokenizer must hold the imported vocabulary: `data.tokenizer=HF_DIR/tokenizer.json`
(data/hf_tokenizer.py) keeps the Hugging Face ids as they are (data/vocab.py `hf_layout`), so row i
of the imported embedding and column i of its head stay row and column i; omnimoe's EOS (and BOS
and PAD, where the model has its own) are the model's own tokens, already trained.

The rows with no imported counterpart (the specials the model lacks, the image, audio and video
codes, the padding rows up to a multiple of 128) keep the run's own random draw, rescaled to the
standard deviation of the imported rows (the embedding's rows and the head's columns each to their
own), so a new id starts at the scale of the known ones. The media embedders are the run's own.
Every other parameter is the import's. With `train.init_lr_scale` < 1 the imported weights learn
at that share of the learning rate (`lr_scales`). The run folder gets an hf_import.json with the
text offset, so that `omnimoe export-hf` writes the text rows back at their Hugging Face ids.
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


def lr_scales(cfg, vocab, params: dict) -> dict:
  """A tree like `params`: `train.init_lr_scale` for every imported weight (on the embedding's and
  the head's imported rows only: an array that broadcasts along the vocabulary axis), 1.0 for
  the rest (the new rows, the media embedders). Multiplies AdamW's updates (train/state.py)."""
  import jax
  scale = float(cfg.train.init_lr_scale)
  out = jax.tree.map(lambda _: 1.0, params)
  imported = np.zeros(vocab.size, bool)
  imported[vocab.text_offset:vocab.text_end] = True
  for w in hf_names.weights(cfg.model, vocab.text_tokens):
    if w.path in VOCAB_AXIS:
      shape = [1, 1]
      shape[VOCAB_AXIS[w.path]] = vocab.size
      value = np.where(imported, scale, 1.0).astype(np.float32).reshape(shape)
    else:
      value = scale
    hf_names.put(out, w.path, value)
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


def check_resume(workdir: pathlib.Path, vocab) -> None:
  """A grown run resumed must lay out its vocabulary as it started (runs grown before 2026-12-02
  placed the Hugging Face ids after omnimoe's four specials); raises ConfigError otherwise."""
  path = pathlib.Path(workdir) / RECORD
  if not path.is_file():
    return
  offset = json.loads(path.read_text()).get("text_offset", 0)
  if offset != vocab.text_offset:
    raise ConfigError(f"{path} says the Hugging Face ids start at row {offset}, but this omnimoe "
                      f"places them at row {vocab.text_offset}; start a new --workdir from the "
                      "import, or export this run with `omnimoe export-hf`")

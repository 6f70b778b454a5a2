"""`omnimoe export-hf --workdir DIR --out HF_DIR [--dtype bfloat16]`: the text part of a run's
latest checkpoint as a Hugging Face Qwen3-MoE folder that transformers loads (config.json,
`model*.safetensors` and, past one shard, `model.safetensors.index.json`).

The run's settings must have a Qwen3-MoE equivalent (train/hf_config.py `refuse_export` names the
first that has none). The vocabulary written is the imported one when the run folder came from
`omnimoe import-hf` or `train.init_from` (its hf_import.json: the Hugging Face ids' rows, from
`text_offset` on: 0 for an import, 4 for a grown run), else every row of omnimoe's vocabulary. The media embedders are not
written. An imported run's config.json is the original one with the keys omnimoe sets replaced, so
the special token ids and the like travel through; a run whose data.tokenizer is a Hugging Face
tokenizer.json gets it copied, with the tokenizer files beside it.

Tensors are cast to `--dtype` (bfloat16, float16 or float32) and written shard by shard (at most
`SHARD_BYTES` each), the checkpoint read parameter by parameter. Errors: HfError (one line, exit 2).
"""
import json
import pathlib
import shutil

import numpy as np

from omnimoe.train import hf_config, hf_names
from omnimoe.train.hf_config import HfError
from omnimoe.train.hf_import import INDEX, RECORD, new_out, undo

DTYPES = ("bfloat16", "float16", "float32")
SHARD_BYTES = 4 << 30
STACKED = "moe_stack"   # the scanned MoE blocks (model/decoder.py; train/checkpoint.py)
VOCAB_PATHS = {("embed", "table_VxD"): 0, ("head_DxV",): 1}   # the vocabulary axis of each


def _numpy_dtype(name: str):
  import ml_dtypes
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _run_config(workdir: pathlib.Path):
  from omnimoe.train import config as config_lib
  path = workdir / "config.yaml"
  if not path.is_file():
    raise HfError(f"--workdir {workdir}: no config.yaml (not an omnimoe run folder)")
  return config_lib.load(path)


def latest_params(workdir: pathlib.Path, step: int | None = None) -> tuple[int, dict]:
  """(step, the latest checkpoint's parameters as numpy arrays: its moving average when it keeps
  one, train.ema_decay), without the optimizer state;
  `step`: that checkpoint's instead."""
  import orbax.checkpoint as ocp
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit())
  if not steps or (step is not None and step not in steps):
    raise HfError(f"--workdir {workdir}: no checkpoint{'' if step is None else f' {step}'} in "
                  f"{workdir / 'checkpoints'}")
  steps = steps if step is None else [step]
  path = workdir / "checkpoints" / str(steps[-1]) / "state"
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(path).item_metadata
    key = "ema" if "ema" in meta else "params"    # train.ema_decay: the moving average
    args = {key: _numpy_args(meta[key])}
    restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(
        item={key: meta[key]}, restore_args=args, partial_restore=True))
  return steps[-1], restored[key]


def _numpy_args(tree):
  import orbax.checkpoint as ocp
  if isinstance(tree, dict):
    return {k: _numpy_args(v) for k, v in tree.items()}
  return ocp.RestoreArgs(restore_type=np.ndarray)


def unroll(params: dict, num_dense_layers: int) -> dict:
  """A `model.scan_layers` parameter tree (`moe_stack`, [M, ...] leaves) in the unrolled form."""
  if STACKED not in params:
    return params
  blocks = dict(params.get("blocks", {}))
  stack = params[STACKED]
  M = len(next(iter(_leaves(stack))))
  for m in range(M):
    blocks[num_dense_layers + m] = _map(lambda a: a[m], stack)
  return {**{k: v for k, v in params.items() if k != STACKED}, "blocks": blocks}


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


def _map(fn, tree):
  return {k: _map(fn, v) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


def blocks_by_int(params: dict) -> dict:
  """orbax keeps the keys of `blocks` as strings; the names table indexes them by int."""
  return {**params, "blocks": {int(k): v for k, v in params["blocks"].items()}}


def _shards(weights: list, dtype: np.dtype) -> list[list]:
  """The weights split into consecutive groups of at most SHARD_BYTES (one weight per group at
  least)."""
  groups, size = [[]], 0
  for w in weights:
    nbytes = sum(int(np.prod(s)) for s in w.shapes) * dtype.itemsize
    if groups[-1] and size + nbytes > SHARD_BYTES:
      groups.append([])
      size = 0
    groups[-1].append(w)
    size += nbytes
  return groups


def export_hf(workdir: str, out: str, dtype: str = "bfloat16") -> dict:
  """Writes the folder; returns {"step", "vocab_size", "shards", "dtype"}."""
  from safetensors.numpy import save_file
  workdir, out = pathlib.Path(workdir).absolute(), pathlib.Path(out).absolute()
  if dtype not in DTYPES:
    raise HfError(f"--dtype {dtype}: must be one of {', '.join(DTYPES)}")
  cfg = _run_config(workdir)
  hf_config.refuse_export(cfg.model)
  record_path = workdir / RECORD
  record = json.loads(record_path.read_text()) if record_path.is_file() else None
  new_out(out)
  step, params = latest_params(workdir)
  params = blocks_by_int(unroll(params, cfg.model.num_dense_layers))
  vocab = record["vocab_size"] if record else params["embed"]["table_VxD"].shape[0]
  rows = np.arange(vocab) + (record.get("text_offset", 0) if record else 0)   # HF id -> row
  config = _config(cfg.model, vocab, dtype, record)
  weights = hf_names.weights(cfg.model, vocab)
  np_dtype = _numpy_dtype(dtype)
  groups = _shards(weights, np_dtype)
  names = (["model.safetensors"] if len(groups) == 1 else
           [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
  created = not out.exists()
  out.mkdir(parents=True, exist_ok=True)
  try:
    weight_map = {}
    for group, name in zip(groups, names):
      tensors = {}
      for w in group:
        array = hf_names.get(params, w.path)
        if w.path in VOCAB_PATHS:
          array = np.take(array, rows, axis=VOCAB_PATHS[w.path])
        for n, t in zip(w.names, w.to_hf(np.asarray(array, np.float32))):
          tensors[n] = np.ascontiguousarray(t.astype(np_dtype))
          weight_map[n] = name
      save_file(tensors, out / name, metadata={"format": "pt"})
    if len(groups) > 1:
      total = sum(int(np.prod(s)) for w in weights for s in w.shapes) * np_dtype.itemsize
      (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                           "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    _copy_tokenizer(cfg.data.tokenizer, out)
  except BaseException:
    undo(out, created)
    raise
  return {"step": step, "vocab_size": vocab, "shards": len(groups), "dtype": dtype}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def _copy_tokenizer(tokenizer: str, out: pathlib.Path) -> None:
  """The run's Hugging Face tokenizer (data.tokenizer=.../tokenizer.json) and the files beside it
  that transformers reads with it."""
  if not tokenizer.endswith(".json"):
    return
  folder = pathlib.Path(tokenizer).absolute().parent
  for name in TOKENIZER_FILES:
    if (folder / name).is_file():
      shutil.copyfile(folder / name, out / name)


def _config(model, vocab: int, dtype: str, record: dict | None) -> dict:
  """config.json: omnimoe's keys over the imported original (if any)."""
  ours = hf_config.hf_config(model, vocab, dtype)
  if not record:
    return ours
  config = dict(record["config"])
  if isinstance(config.get("rope_parameters"), dict):   # the newer spelling of the RoPE keys
    config["rope_parameters"] = {**config["rope_parameters"], "rope_theta": ours.pop("rope_theta")}
    ours.pop("rope_scaling")
  if "dtype" in config:
    config["dtype"] = ours.pop("torch_dtype")
  for alias, key in hf_config.ALIASES.items():
    if alias in config:
      config[alias] = ours.pop(key)
  config.update(ours)
  return config


def describe(result: dict, out: str) -> str:
  return (f"exported step {result['step']} to {out}: config.json and {result['shards']} "
          f"safetensors shard(s), vocabulary {result['vocab_size']}, {result['dtype']}")

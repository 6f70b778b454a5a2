"""The run configuration: YAML in `configs/` -> typed, validated dataclasses.

Precedence: dataclass defaults (the tiny CPU run) < the YAML file < `key.sub=value` overrides.
Every mistake a user can make here raises `ConfigError` with one line naming the key; the command
line turns it into exit code 2.
"""
import dataclasses
import difflib
import math
import pathlib
import typing

import yaml

from omnimoe.data.config import DataConfig
from omnimoe.model import config as model_config
from omnimoe.model.attention import IMPLEMENTATIONS
from omnimoe.model.config import ModelConfig, need, one_of, positive
from omnimoe.model.expert_parallel import DISPATCH_MODES
from omnimoe.model.grouped_matmul import BACKENDS
from omnimoe.model.moe import ROUTERS
from omnimoe.model.router import LONE_EXPERT
from omnimoe.train import config_files, context_batch
from omnimoe.train.mesh_config import MeshConfig


class ConfigError(ValueError):
  """A bad config key or value; the message is one line meant for the user."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 300                # optimizer steps of the whole run
  batch_size: int = 32            # global batch, in packed rows of data.seq_len tokens
  seed: int = 0                   # seeds parameters, data order and eval draws
  init_from: str = ""             # a folder of `omnimoe import-hf`: a new run starts from its
                                  # weights, grown to this run's vocabulary, with a fresh optimizer
                                  # (train/hf_grow.py; docs/huggingface.md); "" = a random start
  init_lr_scale: float = 1.0      # with init_from: the imported weights' learning rate as a share
                                  # of learning_rate (the new vocabulary rows and the media
                                  # embedders train at the full rate)
  learning_rate: float = 3e-3     # peak AdamW learning rate
  warmup_steps: int = 20          # linear warmup from 0 to the peak
  min_lr_ratio: float = 0.1       # cosine decay ends at learning_rate * min_lr_ratio
  weight_decay: float = 0.01      # AdamW decoupled weight decay (matrices only)
  b1: float = 0.9                 # AdamW beta1
  b2: float = 0.95                # AdamW beta2
  grad_clip: float = 1.0          # global gradient-norm clip (0 = off)
  ema_decay: float = 0.97         # > 0: the state keeps an exponential moving average of the
                                  # parameters (decay per step, min(d, (1 + t) / (10 + t)) at step
                                  # t), and evaluation, generation and export use it; 0 = off
  log_every: int = 10             # steps between metrics.jsonl lines
  loss_chunk: int = 0             # cross entropy over chunks of this many positions, each chunk's
                                  # logits recomputed in the backward, so [B, L, V] never exists
                                  # (a last partial chunk is padded); 0 = whole logits at once
  microbatches: int = 1           # gradient accumulation: the global batch is run as this many
                                  # microbatches (rows r, r + M, ...) one after another, their
                                  # gradients summed before one optimizer step (train/step.py)
  context_balance: bool = True    # with mesh.within_rack.context = c > 1: rows cut into 2c chunks,
                                  # device i holding chunks i and 2c-1-i (train/context_batch.py)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 50           # save every N steps (and always at the end)
  keep: int = 3                   # newest checkpoints kept on disk
  async_save: bool = True         # write checkpoints in the background


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  every_steps: int = 100          # evaluate every N steps (and always at the end); 0 = only at end
  batch_size: int = 32            # rows per eval batch
  num_batches: int = 4            # held-out mixed batches for eval/loss
  max_new_tokens: int = 8         # greedy decoding budget for the cross-modal word
  image_limit: int = 0            # held-out images to caption (0 = all)
  audio_limit: int = 300          # fresh tones to caption
  text_limit: int = 0             # held-out text batches for bits per byte (0 = all)
  video_limit: int = 200          # fresh clips for video->text and sync (data.weight_video > 0)


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)


def _is_config(tp) -> bool:
  return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls) -> dict[str, typing.Any]:
  hints = typing.get_type_hints(cls)
  return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def all_keys(cls=Config, prefix: str = "") -> list[str]:
  """Every dotted key of a config class, leaves and sections."""
  keys = []
  for name, tp in _field_types(cls).items():
    key = prefix + name
    keys.append(key)
    if _is_config(tp):
      keys += all_keys(tp, key + ".")
  return keys


def _unknown(key: str) -> ConfigError:
  axis = key.removeprefix("mesh.across_racks.")
  if axis != key and axis in ("expert", "tensor", "context"):
    return ConfigError(f"config key '{key}': the {axis} axis must stay inside one rack (fast domain); "
                       f"set 'mesh.within_rack.{axis}' instead")
  close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
  hint = f" (did you mean '{close[0]}'?)" if close else ""
  return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, tp, value):
  """Checks `value` against the field type `tp`; returns it converted (list -> tuple, int -> float)."""
  def bad():
    return ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
  if tp is bool:
    if not isinstance(value, bool):
      raise bad()
    return value
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise bad()
    return value
  if tp is float:
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
      try:
        return float(value)
      except ValueError:
        raise bad() from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise bad()
    return float(value)
  if tp is str:
    if not isinstance(value, str):
      raise bad()
    return value
  if typing.get_origin(tp) is tuple:
    args = typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
      raise bad()
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value))
    if len(args) != len(value):
      raise bad()
    return tuple(_coerce(key, a, v) for a, v in zip(args, value))
  if _is_config(tp):   # an item of a list of small records, e.g. data.sources[0]
    return _build_item(key, tp, value)
  raise ConfigError(f"config key '{key}' has a type the loader does not know: {tp}")


def _build_item(key: str, cls, value):
  """A list item given as `{field: value, ...}`, or a bare value for the first field."""
  fields = dataclasses.fields(cls)
  if not isinstance(value, dict):
    if isinstance(value, (dict, list, tuple)) or value is None:
      raise ConfigError(f"config key '{key}' expects {_type_name(cls)}, got {value!r}")
    value = {fields[0].name: value}
  types_ = _field_types(cls)
  for name in value:
    if name not in types_:
      close = difflib.get_close_matches(str(name), list(types_), n=1, cutoff=0.5)
      hint = f" (did you mean '{key}.{close[0]}'?)" if close else ""
      raise ConfigError(f"unknown config key '{key}.{name}'{hint}")
  missing = [f.name for f in fields if f.name not in value
             and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
  if missing:
    raise ConfigError(f"config key '{key}' needs '{missing[0]}'")
  return cls(**{name: _coerce(f"{key}.{name}", types_[name], v) for name, v in value.items()})


def _type_name(tp) -> str:
  if typing.get_origin(tp) is tuple:
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
      return f"a list of {_type_name(args[0])}"
    return "a list [" + ", ".join(_type_name(a) for a in args) + "]"
  if _is_config(tp):
    return "{" + ", ".join(f"{name}: {_type_name(t)}" for name, t in _field_types(tp).items()) + "}"
  return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _build(cls, values: dict, prefix: str = ""):
  if not isinstance(values, dict):
    raise ConfigError(f"config key '{prefix.rstrip('.')}' is a section; give it key: value pairs")
  types_ = _field_types(cls)
  kwargs = {}
  for name, value in values.items():
    key = prefix + str(name)
    if name not in types_:
      raise _unknown(key)
    tp = types_[name]
    kwargs[name] = _build(tp, value, key + ".") if _is_config(tp) else _coerce(key, tp, value)
  return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value) -> None:
  parts = key.split(".")
  node, cls = tree, Config
  for i, part in enumerate(parts):
    types_ = _field_types(cls) if cls else {}
    if part not in types_:
      raise _unknown(key)
    tp = types_[part]
    if i == len(parts) - 1:
      node[part] = value
    else:
      if not _is_config(tp):
        raise ConfigError(f"config key '{'.'.join(parts[:i + 1])}' is a value, not a section")
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ConfigError(f"config key '{'.'.join(parts[:i + 1])}' is a section")
      cls = tp


def parse_override(text: str) -> tuple[str, typing.Any]:
  """`model.num_layers=2` -> ('model.num_layers', 2); the value is read as YAML."""
  if "=" not in text:
    raise ConfigError(f"override '{text}' is not of the form key.sub=value")
  key, raw = text.split("=", 1)
  try:
    value = yaml.safe_load(raw) if raw.strip() else ""
  except yaml.YAMLError:
    raise ConfigError(f"override '{text}': the value is not valid YAML") from None
  return key.strip(), value


def load(path: str | pathlib.Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
  """Reads a YAML config (or the defaults when `path` is None) and applies overrides."""
  tree: dict = {}
  if path is not None:
    found = config_files.find(path)
    if found is None:
      names = ", ".join(sorted(config_files.shipped()))
      raise ConfigError(f"config file '{path}' does not exist (shipped configs: {names})")
    path = found
    try:
      tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
      line = getattr(getattr(e, "problem_mark", None), "line", None)
      where = f" (line {line + 1})" if line is not None else ""
      raise ConfigError(f"config file '{path}' is not valid YAML{where}") from None
    if not isinstance(tree, dict):
      raise ConfigError(f"config file '{path}' must hold key: value pairs at the top")
  for text in overrides:
    key, value = parse_override(text)
    _set_dotted(tree, key, value)
  cfg = _build(Config, tree)
  validate(cfg)
  return cfg


def validate(cfg: Config) -> None:
  """Checks values that are well-typed but impossible; a ConfigError (one line) names the key."""
  try:
    _check_choices(cfg.model)
    model_config.check(cfg.model)
    _check_run(cfg)
    _check_data(cfg.data)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _check_choices(m: ModelConfig) -> None:
  """Each key that names a choice, against the list of the code that runs it."""
  one_of("model.attention", m.attention, IMPLEMENTATIONS)
  one_of("model.moe.backend", m.moe.backend, BACKENDS)
  one_of("model.moe.dispatch", m.moe.dispatch, DISPATCH_MODES)
  one_of("model.moe.router", m.moe.router, ROUTERS)
  one_of("model.moe.lone_expert", m.moe.lone_expert, LONE_EXPERT)
  one_of("model.dtype", m.dtype, model_config.DTYPES)
  need(m.param_dtype == "float32", "model.param_dtype",
       f"must be float32 (got '{m.param_dtype}'): parameters and AdamW's moments stay float32 "
       "masters, so small updates are not rounded away; model.dtype=bfloat16 computes in bfloat16")


def _check_run(cfg: Config) -> None:
  """The train, checkpoint and eval sections."""
  t = cfg.train
  for name in ("steps", "batch_size", "log_every", "learning_rate"):
    positive(f"train.{name}", getattr(t, name))
  need(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
  need(t.loss_chunk >= 0, "train.loss_chunk", f"must be >= 0 (0 = off), got {t.loss_chunk}")
  positive("train.microbatches", t.microbatches)
  need(t.batch_size % t.microbatches == 0, "train.microbatches",
       f"must divide train.batch_size={t.batch_size}, got {t.microbatches}")
  context_batch.check_length(cfg.data.seq_len, cfg.mesh.within_rack.context, t.context_balance)
  need(0 <= t.ema_decay < 1, "train.ema_decay", f"must lie in [0, 1) (0 = off), got {t.ema_decay}")
  need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", f"must lie in [0, 1], got {t.min_lr_ratio}")
  need(0 <= t.init_lr_scale <= 1, "train.init_lr_scale", f"must lie in [0, 1], got {t.init_lr_scale}")
  need(t.init_lr_scale == 1 or bool(t.init_from), "train.init_lr_scale",
       f"is {t.init_lr_scale} but train.init_from is empty: there are no imported weights to slow")
  positive("checkpoint.every_steps", cfg.checkpoint.every_steps)
  positive("checkpoint.keep", cfg.checkpoint.keep)
  positive("eval.batch_size", cfg.eval.batch_size)
  need(cfg.eval.every_steps >= 0, "eval.every_steps", f"must be >= 0, got {cfg.eval.every_steps}")


def _check_data(d: DataConfig) -> None:
  positive("data.seq_len", d.seq_len)
  need(0 < d.heldout_fraction < 1, "data.heldout_fraction",
       f"must lie in (0, 1), got {d.heldout_fraction}")
  need(d.image_shift >= 0, "data.image_shift", f"must be >= 0 (0 = off), got {d.image_shift}")
  need(d.image_loss in ("all", "caption_first"), "data.image_loss",
       f"must be 'all' or 'caption_first', got '{d.image_loss}'")
  weights = (d.weight_image, d.weight_audio, d.weight_text, d.weight_video)
  need(min(weights) >= 0 and sum(weights) > 0, "data.weight_text",
       "mixture weights (data.weight_image/audio/text/video) must be >= 0 and not all zero")
  from omnimoe.data.video_layout import config_problems as video_problems
  for key, why in video_problems(d):
    need(False, key, why)
  for i, source in enumerate(d.sources):
    need(bool(source.path.strip()), f"data.sources[{i}].path", "must not be empty")
    need(math.isfinite(source.weight) and source.weight >= 0, f"data.sources[{i}].weight",
         f"must be a number >= 0, got {source.weight}")
  need(not d.sources or sum(s.weight for s in d.sources) > 0, "data.sources",
       "needs a source with a positive weight (or [] for the default dataset)")
  if d.task != "mixture":   # the retrieval task's own keys (data/pipeline/needle.py)
    from omnimoe.data.pipeline.needle import check as check_needle
    check_needle(d)


def to_dict(cfg) -> dict:
  """A plain nested dict (tuples as lists), ready for YAML or JSON."""
  def plain(x):
    if isinstance(x, dict):
      return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [plain(v) for v in x]
    return x
  return plain(dataclasses.asdict(cfg))


def dump(cfg: Config) -> str:
  return yaml.safe_dump(to_dict(cfg), sort_keys=False)

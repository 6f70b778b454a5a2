"""The training run: resume or init, step, log, evaluate, checkpoint, stop cleanly.

Metrics are fetched one step late, so the host never waits on the step it just dispatched, except
right before a checkpoint or an evaluation, whose state must be known to be finite.
"""
import contextlib
import dataclasses
import math
import os
import pathlib
import socket
import time
import typing

import jax
import numpy as np

from omnimoe import data
from omnimoe.data.pipeline import sources as sources_lib
from omnimoe.train import coactivation, config as config_lib
from omnimoe.train import context_batch, media_files
from omnimoe.train.checkpoint import Checkpoints
from omnimoe.train.config import Config
from omnimoe.train.evaluate import Evaluator
from omnimoe.train.mesh import batch_sharding, check_batch, global_batch, make_mesh
from omnimoe.train import mfu
from omnimoe.train.preemption import StopFlag
from omnimoe.train.profiling import Profile
from omnimoe.train.metrics import MetricsWriter, Progress
from omnimoe.train.plan import model_flops_per_token
from omnimoe.train.state import Setup, eval_params, init_state, make_setup, placed_ema_start
from omnimoe.model.modality import NAMES as MODALITIES
from omnimoe.train.step import MOE_STATS, make_train_step


class NonFiniteLoss(RuntimeError):
  def __init__(self, step: int, last_good: int | None):
    where = f"step {last_good}" if last_good is not None else "none saved yet"
    super().__init__(f"non-finite loss at step {step}; stopped. Last good checkpoint: {where}")
    self.step, self.last_good = step, last_good


class WorkdirError(RuntimeError):
  pass


@dataclasses.dataclass
class Summary:
  workdir: pathlib.Path
  step: int
  final_loss: float | None
  eval: dict
  wall_s: float
  stopped_early: bool = False
  already_done: bool = False

  def describe(self) -> str:
    w = self.workdir
    if self.already_done:
      head = f"run in {w} already finished at step {self.step}; nothing to do"
    elif self.stopped_early:
      head = f"stopped at step {self.step} (SIGTERM); checkpoint saved, rerun the same command to resume"
    else:
      head = f"finished {self.step} steps in {self.wall_s / 60:.1f} min"
    lines = [head]
    if self.final_loss is not None:
      lines.append(f"  final train loss     {self.final_loss:.4f}")
    for k, v in sorted(self.eval.items()):
      lines.append(f"  {k:<32s} {v:.4f}")
    lines += [f"  checkpoints          {w / 'checkpoints'}",
              f"  metrics              {w / 'metrics.jsonl'}",
              f"  tensorboard          {w / 'tensorboard'}",
              f"  resolved config      {w / 'config.yaml'}"]
    return "\n".join(lines)


def prepare_workdir(workdir: str | pathlib.Path) -> pathlib.Path:
  path = pathlib.Path(workdir).absolute()
  try:
    path.mkdir(parents=True, exist_ok=True)
    # One probe per process: the processes of a multi-host run check the same workdir at once,
    # and a shared name let one process delete the other's probe (seen as a start-up hang: the
    # failed process exits, its peer waits for it in jax's CPU client).
    probe = path / f".write_test-{socket.gethostname()}-{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise WorkdirError(f"cannot write to workdir '{path}': {e.strerror or e}") from None
  return path


def _moe_metrics(raw: dict) -> dict:
  """Per-layer MoE statistics [L, ...] -> metrics.jsonl keys (see docs/moe.md, "Telemetry").

  A modality with no tokens in the step's batch gets no keys (rather than a misleading 0)."""
  out = {}
  layers = [int(i) for i in np.asarray(raw["moe_layers"])]   # block index of each MoE layer
  load_LxMxE = np.asarray(raw["expert_load_by_modality"])
  present_M = load_LxMxE.sum(axis=(0, 2)) > 0
  for i, row in zip(layers, np.asarray(raw["expert_load"])):
    out[f"moe/expert_load/layer_{i}"] = row
  for name, values in (("active_fraction", raw["active_fraction"]),
                       ("router_entropy", raw["router_entropy"]),
                       ("dropped_fraction", raw["dropped_fraction"]),
                       ("threshold", raw.get("router_threshold"))):
    if values is None:
      continue
    values = np.asarray(values)
    out[f"moe/{name}"] = float(values.mean())
    for i, v in zip(layers, values):
      out[f"moe/{name}/layer_{i}"] = float(v)
  for m, modality in enumerate(MODALITIES):
    if not present_M[m]:
      continue
    for name in ("active_fraction", "router_entropy"):
      per_layer = np.asarray(raw[f"{name}_by_modality"])[:, m]
      out[f"moe/{name}/{modality}"] = float(per_layer.mean())
      for i, v in zip(layers, per_layer):
        out[f"moe/{name}/{modality}/layer_{i}"] = float(v)
    for i, row in zip(layers, load_LxMxE[:, m]):
      out[f"moe/expert_load/{modality}/layer_{i}"] = row
  return out


def _metrics_line(raw: dict, *, tokens: int, seconds: float, real_tokens: float = 0.0,
                  flops_per_token: float = 0.0, devices: int = 1, peak: float | None = None) -> dict:
  out = {k: float(np.asarray(v)) for k, v in raw.items()
         if k not in (*MOE_STATS, "router_threshold", "real_tokens")}
  out.update(_moe_metrics(raw))
  out["tokens_per_s"] = tokens / max(seconds, 1e-9)
  out.update(mfu.utilisation(real_tokens, seconds, flops_per_token, devices, peak))
  return out


class _StepMetrics:
  """Each step's metrics, fetched one step late: checked (a non-finite loss stops the run) and
  written every `train.log_every` steps. tokens/s is measured over a window that restarts at each
  written line and after each checkpoint or evaluation, whose time is not training time."""

  def __init__(self, cfg: Config, start: int, writer: MetricsWriter, bar: Progress,
               ckpts: Checkpoints, flops: tuple = (0.0, 1, None)):
    self.log_every, self.total = cfg.train.log_every, cfg.train.steps
    self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    # (model FLOPs per token, devices, peak TFLOP/s per device or None): train/mfu.py
    self.flops_per_token, self.devices, self.peak = flops
    self.real_tokens = 0.0                 # non-padding tokens of the window's fetched steps
    self.writer, self.bar, self.ckpts = writer, bar, ckpts
    self.pending = None                    # (step, metrics still on device)
    self.window = (start, time.time())     # (first step, start time) of the tokens/s window
    self.last_loss = None
    self.coactivation = coactivation.TrainCounts()   # the steps' counts since the last eval

  def hold(self, step: int, raw: dict) -> None:
    """Fetches the previous step's metrics, then keeps this step's until the next call."""
    self.fetch()
    self.pending = (step, raw)

  def fetch(self) -> None:
    """Fetches the pending step's metrics (if any): stops on a non-finite loss, writes a line
    every log_every steps and at the last step."""
    if self.pending is None:
      return
    (step, raw), self.pending = self.pending, None
    raw = jax.device_get(raw)
    self.real_tokens += float(raw.get("real_tokens", 0))
    self.coactivation.add(raw.get("coactivation_by_modality"))
    loss = float(raw["loss"])
    if not (math.isfinite(loss) and math.isfinite(float(raw["grad_norm"]))):
      self.ckpts.wait()
      raise NonFiniteLoss(step, self.ckpts.latest_step())
    self.last_loss = loss
    if step % self.log_every == 0 or step == self.total:
      first, since = self.window
      line = _metrics_line(raw, tokens=self.tokens_per_step * (step - first),
                           seconds=time.time() - since, real_tokens=self.real_tokens,
                           flops_per_token=self.flops_per_token, devices=self.devices,
                           peak=self.peak)
      self.writer.write(step, line)
      self.bar.update(step, line)
      self.restart_window(step)

  def restart_window(self, step: int) -> None:
    self.window = (step, time.time())
    self.real_tokens = 0.0


@dataclasses.dataclass
class _Run:
  """What a run works with: its folder, mesh, dataset, iterator, checkpoints and state."""
  workdir: pathlib.Path
  mesh: jax.sharding.Mesh
  info: data.DatasetInfo
  setup: Setup
  batches: typing.Any           # data.train_iterator(...)
  ckpts: Checkpoints
  state: dict
  resumed_from: int | None      # the checkpoint step the state came from; None: a fresh start

  def close(self) -> None:
    self.batches.close()
    self.ckpts.close()


@contextlib.contextmanager
def _data_errors():
  """The data package checks its own keys and names them in a ValueError: a ConfigError here."""
  try:
    yield
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None


def _open_run(cfg: Config, workdir: str | pathlib.Path) -> _Run:
  """Writes the resolved config, then resumes from the latest checkpoint or initialises."""
  workdir = prepare_workdir(workdir)
  if jax.process_index() == 0:
    (workdir / "config.yaml").write_text(config_lib.dump(cfg))
  mesh = make_mesh(cfg.mesh)
  check_batch(mesh, cfg.train.batch_size, microbatches=cfg.train.microbatches)
  with _data_errors():   # a context axis filled by -1 is known only now
    context_batch.check_length(cfg.data.seq_len, mesh.shape["context"], cfg.train.context_balance)
  with _data_errors():
    info = data.dataset_info(cfg.data, cfg.train.seed)
    batches = data.train_iterator(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
  setup = make_setup(cfg, mesh, info)
  if jax.process_index() == 0 and cfg.data.task == "mixture":   # codebooks and tokenizer travel
    with _data_errors():                                          # with the checkpoints
      media_files.save(workdir, sources_lib.resolve(cfg.data))
  ckpts = Checkpoints(workdir / "checkpoints", keep=cfg.checkpoint.keep,
                      async_save=cfg.checkpoint.async_save)
  latest = ckpts.latest_step()
  if latest is None:
    state = init_state(cfg, setup)
    if cfg.train.init_from:        # a Hugging Face import's weights, grown to this run's vocabulary
      from omnimoe.train import hf_grow
      state = hf_grow.grow(state, cfg, info.vocab, workdir)
      if "ema" in state:         # the average starts at the grown weights
        state["ema"] = placed_ema_start(setup, state["params"])
  else:
    if cfg.train.init_from:
      from omnimoe.train import hf_grow
      hf_grow.check_resume(workdir, info.vocab)
    state, data_state = ckpts.restore(latest, setup)
    if data_state is not None:     # None: an imported checkpoint, the data starts afresh
      batches.set_state(data_state)
  return _Run(workdir, mesh, info, setup, batches, ckpts, state, latest)


def train(cfg: Config, workdir: str | pathlib.Path, *, progress: bool = True,
          profile: tuple[int, int] | None = None) -> Summary:
  t_start = time.time()
  run = _open_run(cfg, workdir)
  start, total = int(run.state["step"]), cfg.train.steps
  if start >= total:
    run.close()
    return Summary(run.workdir, start, None, {}, time.time() - t_start, already_done=True)
  lead = jax.process_index() == 0
  writer = MetricsWriter(run.workdir, enabled=lead)
  bar = Progress(start=start, total=total, enabled=progress and lead)
  try:
    state, last_loss, last_eval = _steps(cfg, run, writer, bar, profile)
  finally:
    run.close()
    writer.close()
    bar.close()
  step = int(state["step"])
  return Summary(run.workdir, step, last_loss, last_eval, time.time() - t_start,
                 stopped_early=step < total)


def _due(step: int, every: int, total: int) -> bool:
  """Every `every` steps (0: never) and at the last step."""
  return step == total or (every > 0 and step % every == 0)


def _steps(cfg: Config, run: _Run, writer: MetricsWriter, bar: Progress,
           profile: tuple[int, int] | None = None):
  """Runs the steps after the run's state: -> (state, last train loss, last eval metrics)."""
  train_step = make_train_step(cfg, run.setup, batch_sharding(run.mesh, cfg.data.seq_len))
  context = run.mesh.shape["context"]
  evaluator = Evaluator(cfg, run.setup, run.info.vocab)
  for note in evaluator.notes:
    bar.message(note)
  if run.resumed_from is not None:
    bar.message(f"resumed from {run.workdir / 'checkpoints' / str(run.resumed_from)}")
  state, start, total, last_eval = run.state, int(run.state["step"]), cfg.train.steps, {}
  flops = model_flops_per_token(cfg, run.setup.abstract_state["params"])
  peak, source = mfu.peak_tflops()
  bar.message(f"mfu: {flops / 1e9:.4f} GFLOP per token (model count); peak "
              + (f"{peak:.3g} TFLOP/s per device, " if peak else "") + source)
  metrics = _StepMetrics(cfg, start, writer, bar, run.ckpts, (flops, jax.device_count(), peak))
  trace = Profile(profile, run.workdir, bar)
  with StopFlag() as stop:
    for step in range(start + 1, total + 1):
      trace.before(step)
      batch = context_batch.prepare(next(run.batches), context, cfg.train.context_balance)
      state, raw = train_step(state, global_batch(batch, run.mesh))
      trace.after(step, state)
      metrics.hold(step, raw)        # logs the step before: the host never waits on this one
      stopping = stop.at(step)       # read once, so that a stop is always saved first
      if _due(step, cfg.checkpoint.every_steps, total) or stopping:
        metrics.fetch()              # a checkpoint is known to be finite
        run.ckpts.save(step, state, run.batches.get_state())
        metrics.restart_window(step)
      if _due(step, cfg.eval.every_steps, total):
        metrics.fetch()
        last_eval = _evaluate(evaluator, state, step, writer, bar)
        _save_coactivation(evaluator, state, step, run.workdir, metrics.coactivation)
        metrics.restart_window(step)
      if stopping:
        break
    trace.stop(state)                # a run stopped inside the traced steps
    metrics.fetch()
  return state, metrics.last_loss, last_eval


def _evaluate(evaluator: Evaluator, state: dict, step: int, writer: MetricsWriter,
              bar: Progress) -> dict:
  result = evaluator(eval_params(state), state.get("router"))
  writer.write(step, result)
  bar.message(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(result.items())))
  return result


def _save_coactivation(evaluator: Evaluator, state: dict, step: int, workdir: pathlib.Path,
                       counts: coactivation.TrainCounts) -> None:
  """Writes `<workdir>/coactivation.npz` (train/coactivation.py): the train steps' counts since
  the last evaluation and the held-out batches'."""
  heldout, choices = evaluator.coactivation(eval_params(state), state.get("router"))
  train, steps = counts.take(heldout.shape)
  if jax.process_index() == 0:
    layers = range(evaluator.cfg.model.num_dense_layers, evaluator.cfg.model.num_layers)
    coactivation.save(workdir, step=step, moe_layers=list(layers), train=train, train_steps=steps,
                      heldout=heldout, heldout_choices=choices)


def evaluate(cfg: Config, workdir: str | pathlib.Path) -> tuple[int, dict, tuple]:
  """Evaluates the latest checkpoint in `workdir`; returns (step, metrics, notes on what eval
  skipped)."""
  latest, state, setup, info, _ = restore_latest(cfg, workdir)
  evaluator = Evaluator(cfg, setup, info.vocab)
  return latest, evaluator(eval_params(state), state.get("router")), evaluator.notes


def restore_latest(cfg: Config, workdir: str | pathlib.Path, info=None):
  """The latest checkpoint of `workdir` for evaluation: (step, state, setup, dataset info, mesh);
  `info` (a data.DatasetInfo) instead of the data config's, e.g. the run's saved media."""
  workdir = pathlib.Path(workdir).absolute()
  ckpts = Checkpoints(workdir / "checkpoints", keep=cfg.checkpoint.keep, async_save=False)
  latest = ckpts.latest_step()
  if latest is None:
    raise WorkdirError(f"no checkpoint in '{workdir / 'checkpoints'}' to evaluate")
  mesh = make_mesh(cfg.mesh)
  if info is None:
    with _data_errors():
      info = data.dataset_info(cfg.data, cfg.train.seed)
  setup = make_setup(cfg, mesh, info)
  state, _ = ckpts.restore(latest, setup)
  ckpts.close()
  return latest, state, setup, info, mesh

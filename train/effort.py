"""An inference-time compute dial: evaluate one trained model at several active fractions (experts
taken / num_experts) without retraining, `omnimoe eval --workdir DIR --effort low,medium,high`.

f0, the trained active fraction, is top_k / num_experts for router `topk` and
`target_active_fraction` for router `dynamic`. Efforts:

  none    1 / num_experts: the fewest experts a token can take (top-1; k_min for `dynamic`)
  low     f0 / 2
  medium  f0: the model exactly as trained (same graph, same thresholds), so its metrics equal
          plain `omnimoe eval`
  high    2 * f0
  xhigh   4 * f0 (at most 1)
  0.25    that fraction (any number in (0, 1])
`omnimoe generate --effort LEVEL` takes the same names (`at_effort`).

How a fraction f is reached, with the same parameters (their shapes do not depend on it):
  topk     k = clamp(round(f * E), 1, E): the graph is rebuilt with `model.moe.top_k = k`.
  dynamic  each MoE layer's threshold is calibrated by bisection on held-out eval batches
           (`eval.num_batches` of them: the batches eval/loss is measured on; only their routing
           is looked at) until the layer's measured active fraction is within 1% of f
           (`calibrate_thresholds`); `k_max` is raised to at least ceil(2 f E) (at most E) so that
           high fractions are reachable. A token takes at least `k_min` experts: at or below
           f = k_min / E the thresholds are 0 and every token takes exactly k_min (a note says when
           f was lower than that).
The measured active fraction (mean over MoE layers and held-out tokens, and by modality) is
reported for every effort.
"""
import dataclasses
import math
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from omnimoe.train import config as config_lib, loop
from omnimoe.train.config import Config
from omnimoe.train.evaluate import Evaluator
from omnimoe.model.modality import CODES, NAMES as MODALITIES
from omnimoe.train.state import Setup, eval_params, make_setup, merge

NAMED = {"low": 0.5, "medium": 1.0, "high": 2.0, "xhigh": 4.0}   # multiples of f0, the trained
LEVELS = ("none", *NAMED)                                            # active fraction; none: 1/E


@dataclasses.dataclass(frozen=True)
class Effort:
  label: str         # as the user wrote it: low, medium, high or a number
  fraction: float    # the active fraction asked for
  as_trained: bool   # medium: run the model exactly as trained


def parse_efforts(text: str) -> list[str]:
  """'low,medium,0.3' -> ['low', 'medium', '0.3']; a bad item is a one-line ConfigError."""
  labels = [item.strip() for item in text.split(",") if item.strip()]
  if not labels:
    raise config_lib.ConfigError("--effort needs a comma-separated list such as low,medium,high")
  for label in labels:
    if label in LEVELS:
      continue
    try:
      value = float(label)
    except ValueError:
      value = None
    if value is None or not 0 < value <= 1:
      raise config_lib.ConfigError(f"--effort item '{label}' must be {', '.join(LEVELS)} or an "
                                   f"active fraction in (0, 1]")
  if len(set(labels)) != len(labels):
    raise config_lib.ConfigError(f"--effort lists an item twice: '{text}'")
  return labels


def trained_fraction(cfg: Config) -> float:
  """f0: top_k / num_experts (router topk) or target_active_fraction (router dynamic)."""
  moe = cfg.model.moe
  return moe.target_active_fraction if moe.router == "dynamic" else moe.top_k / moe.num_experts


def resolve(labels: list[str], cfg: Config) -> list[Effort]:
  f0, E = trained_fraction(cfg), cfg.model.moe.num_experts
  fraction = lambda label: (1 / E if label == "none" else min(NAMED[label] * f0, 1.0)
                            if label in NAMED else float(label))
  return [Effort(label, fraction(label), label == "medium") for label in labels]


def top_k_for(fraction: float, num_experts: int) -> int:
  """k = clamp(round(f * E), 1, E), halves rounded up."""
  return min(max(math.floor(fraction * num_experts + 0.5), 1), num_experts)


def with_moe(cfg: Config, **changes) -> Config:
  """`cfg` with `model.moe` fields replaced (the parameter shapes stay the same)."""
  moe = dataclasses.replace(cfg.model.moe, **changes)
  return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=moe))


def make_fraction_fn(setup: Setup) -> Callable:
  """A jitted (params, batch, router) -> (active_fraction [M], active_fraction_by_modality [M, 3],
  valid tokens, valid tokens by modality [3])."""
  def fraction(params, batch, router):
    _, aux = merge(setup, params)(batch, router)
    valid_BxL = batch["segment_ids"] > 0
    modality_BxL = jnp.asarray(batch["modality"], jnp.int32)
    n_M = jnp.stack([jnp.sum(valid_BxL & (modality_BxL == code))
                     for code in CODES])
    return aux["active_fraction"], aux["active_fraction_by_modality"], jnp.sum(valid_BxL), n_M
  return jax.jit(fraction)


def measure(fraction_fn: Callable, params, batches: list, router) -> dict:
  """Active fraction over `batches`, weighted by valid tokens: {"per_layer": [M] float64,
  "active_fraction": mean over layers, "active_fraction/<m>": the same within modality m}."""
  total, total_M, count, count_M = 0.0, 0.0, 0.0, 0.0
  for batch in batches:
    f_L, f_LxM, n, n_M = jax.device_get(fraction_fn(params, batch, router))
    total = total + np.asarray(f_L, np.float64) * float(n)
    total_M = total_M + np.asarray(f_LxM, np.float64) * np.asarray(n_M, np.float64)
    count, count_M = count + float(n), count_M + np.asarray(n_M, np.float64)
  per_layer = total / max(count, 1.0)
  out = {"per_layer": per_layer, "active_fraction": float(per_layer.mean())}
  for m, name in enumerate(MODALITIES):
    if count_M[m] > 0:
      out[f"active_fraction/{name}"] = float((total_M[:, m] / count_M[m]).mean())
  return out


def calibrate_thresholds(measure_layers: Callable[[np.ndarray], np.ndarray], start: np.ndarray,
                         target: float, *, rel_tol: float = 0.01, iters: int = 20) -> np.ndarray:
  """Per-layer thresholds whose measured active fractions lie within `rel_tol` of `target` (or
  come closest).

  `measure_layers(thresholds [M]) -> active fraction per layer [M]`, nondecreasing in each layer's
  own threshold; a layer's fraction depends on the thresholds at or below it only. Each round
  bisects, on [0, 1] and all at once, every layer not yet within tolerance, keeping for each the
  threshold that came closest, then measures again. Layer 0 has nothing below it, so the first
  round settles it, and a layer whose lower layers are settled is settled by its next round: at
  most M rounds run, usually one or two (a layer's fraction hardly moves with the thresholds below
  it)."""
  thresholds = np.asarray(start, np.float64).copy()
  M, tol = len(thresholds), rel_tol * target
  measured = np.asarray(measure_layers(thresholds), np.float64)
  for _ in range(M):
    todo = np.abs(measured - target) > tol
    if not todo.any():
      break
    lo, hi = np.zeros(M), np.ones(M)
    best, best_err = thresholds.copy(), np.where(todo, np.inf, 0.0)
    for _ in range(iters):
      trial = np.where(todo, (lo + hi) / 2, thresholds)
      f = np.asarray(measure_layers(trial), np.float64)
      err = np.abs(f - target)
      better = todo & (err < best_err)
      best, best_err = np.where(better, trial, best), np.where(better, err, best_err)
      lo, hi = np.where(todo & (f <= target), trial, lo), np.where(todo & (f > target), trial, hi)
      if (err[todo] <= tol).all():
        break
    thresholds = best
    measured = np.asarray(measure_layers(thresholds), np.float64)
  return thresholds


class _Graphs:
  """The trained model's graph and its variants (other `model.moe` fields, same parameters), each
  built and compiled once: moe changes -> (setup, Evaluator, fraction_fn)."""

  def __init__(self, cfg: Config, setup: Setup, mesh, info):
    self.cfg, self.mesh, self.info = cfg, mesh, info
    self.base = (setup, Evaluator(cfg, setup, info.vocab), make_fraction_fn(setup))
    self.built = {}

  def get(self, **changes):
    moe = self.cfg.model.moe
    key = tuple(sorted((k, v) for k, v in changes.items() if getattr(moe, k) != v))
    if not key:
      return self.base
    if key not in self.built:
      variant = with_moe(self.cfg, **dict(key))
      setup = make_setup(variant, self.mesh, self.info)
      evaluator = Evaluator(variant, setup, self.info.vocab, sets=self.base[1].sets)   # same data
      self.built[key] = (setup, evaluator, make_fraction_fn(setup))
    return self.built[key]


def _dynamic_k_max(effort: Effort, cfg: Config) -> int:
  moe = cfg.model.moe
  return min(moe.num_experts, max(moe.k_max, math.ceil(2 * effort.fraction * moe.num_experts)))


def _calibrated(effort: Effort, cfg: Config, router: dict, fraction_fn, params, batches,
                notes: list) -> dict:
  """The router state whose per-layer thresholds reach `effort` (router dynamic)."""
  moe = cfg.model.moe
  as_router = lambda t: {**router, "threshold": jnp.asarray(t, jnp.float32)}
  floor = moe.k_min / moe.num_experts
  if effort.fraction <= floor:   # threshold 0: every token takes exactly k_min experts
    thresholds = np.zeros(cfg.model.num_moe_layers)
    if effort.fraction < floor:
      notes.append(f"effort {effort.label}: active fraction {effort.fraction:.4g} is below "
                   f"k_min/num_experts = {floor:.4g}, the fewest experts a token takes; ran at that")
  else:
    layers = lambda t: measure(fraction_fn, params, batches, as_router(t))["per_layer"]
    thresholds = calibrate_thresholds(layers, np.asarray(router["threshold"]), effort.fraction)
  return as_router(thresholds)


def at_effort(label: str, cfg: Config, setup: Setup, mesh, info, params, router,
              batches: Callable[[], list]) -> tuple[Setup, dict, dict, list[str]]:
  """The graph and router state that run a checkpoint at one effort (`omnimoe generate`):
  (setup, router, details, notes). `batches()` gives held-out batches for calibrating a dynamic
  router's thresholds (called only then)."""
  [effort] = resolve(parse_efforts(label), cfg)
  moe, notes = cfg.model.moe, []
  if effort.as_trained:
    return setup, router, {"active_fraction": effort.fraction}, notes
  if moe.router == "topk":
    k = top_k_for(effort.fraction, moe.num_experts)
    return make_setup(with_moe(cfg, top_k=k), mesh, info), router, {"top_k": k}, notes
  variant = with_moe(cfg, k_max=_dynamic_k_max(effort, cfg))
  setup = make_setup(variant, mesh, info)
  router = _calibrated(effort, cfg, router, make_fraction_fn(setup), params, batches(), notes)
  return setup, router, {"k_max": variant.model.moe.k_max,
                         "threshold": np.asarray(router["threshold"]).tolist()}, notes


def _run(effort: Effort, graphs: _Graphs, params, router, batches) -> tuple[dict, dict, list[str]]:
  """Evaluates at `effort`: (details of how, measured active fractions and eval metrics, notes)."""
  cfg = graphs.cfg
  moe, E = cfg.model.moe, cfg.model.moe.num_experts
  notes = []
  if effort.as_trained:
    details = {"top_k": moe.top_k} if moe.router == "topk" else {
        "k_max": moe.k_max, "threshold": np.asarray(router["threshold"]).tolist()}
    graph = graphs.base
  elif moe.router == "topk":
    details = {"top_k": top_k_for(effort.fraction, E)}
    graph = graphs.get(**details)
  else:
    k_max = _dynamic_k_max(effort, cfg)
    graph = graphs.get(k_max=k_max)
    router = _calibrated(effort, cfg, router, graph[2], params, batches, notes)
    details = {"k_max": k_max, "threshold": np.asarray(router["threshold"]).tolist()}
  _, evaluator, fraction_fn = graph
  measured = measure(fraction_fn, params, batches, router)
  measured.pop("per_layer")
  return details, {**measured, **evaluator(params, router)}, notes


def evaluate_efforts(cfg: Config, workdir: str | pathlib.Path, labels: list[str],
                     log: Callable[[str], None] = lambda _: None) -> dict:
  """Evaluates the latest checkpoint of `workdir` at every effort in `labels` (parse_efforts).

  Returns {"step", "router", "trained_active_fraction", "efforts": {label: {"requested_fraction",
  "top_k" (topk) or "k_max" and "threshold" [per MoE layer] (dynamic), "active_fraction",
  "active_fraction/<m>", "eval/...": ...}}, "notes" (when there are any)}."""
  step, state, setup, info, mesh = loop.restore_latest(cfg, workdir)
  params, router = eval_params(state), state.get("router")
  graphs = _Graphs(cfg, setup, mesh, info)
  batches = graphs.base[1].sets.mixed
  results, notes = {}, list(graphs.base[1].notes)
  for effort in resolve(labels, cfg):
    details, metrics, effort_notes = _run(effort, graphs, params, router, batches)
    results[effort.label] = {"requested_fraction": effort.fraction, **details, **metrics}
    notes += effort_notes
    log(f"effort {effort.label}: active fraction {metrics['active_fraction']:.4f} "
        f"(asked {effort.fraction:.4f}), eval/loss {metrics.get('eval/loss', float('nan')):.4f}")
  return {"step": step, "router": cfg.model.moe.router,
          "trained_active_fraction": trained_fraction(cfg), "efforts": results,
          **({"notes": notes} if notes else {})}

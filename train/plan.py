"""`omnimoe plan`: what a config costs on its mesh, from an ahead-of-time compile on simulated devices.

Nothing is allocated and no step runs: the train step is lowered with abstract inputs and compiled
for the mesh, then XLA's own analyses are read back:
- parameters and optimizer state per device, from the shardings the rules give;
- activations per device: the compiled step's temporary buffers (`memory_analysis().temp_size`);
- FLOPs per token: `cost_analysis()["flops"]` of the per-device program x devices / tokens per step.
  XLA counts a loop body once, and the blocked grouped matmul is a loop with a dynamic trip count,
  so this undercounts the experts; the model's own count is printed beside it:
  6 x (matmul parameters a token uses, embedding excluded) + 6 x layers x heads x head_dim x seq_len (causal
  attention, forward + backward), with a token using top_k (or target_active_fraction x E) experts;
- collective bytes per device per step, by kind, summed from the compiled program's collectives;
- with a `context` axis, the all-gathers whose result spans a whole row (`whole_row_gathers`):
  model.context_parallel=all_gather gathers K/V so, ring never does (K/V move by
  collective-permute). `length_table` (`omnimoe plan --lengths`) repeats the plan at several
  sequence lengths under both strategies.
The compile is for the CPU backend, so figures are those of XLA:CPU's partitioning and buffer
assignment; on GPU/TPU the same partitioning holds while fusion and memory reuse differ.

`platform` ("gpu" or "tpu"; `omnimoe plan --platform`) plans the choices made on that accelerator:
`model.moe.dispatch=auto` becomes ragged_all_to_all when the mesh has an expert axis. XLA:CPU has
no ragged_all_to_all, so the step is compiled with the collective emulated by a padded all_to_all
(model/expert_parallel.py `Platform(platform, emulate_ragged=True)`, passed to the model as it is
built): its activations are an upper bound and its all-to-all
bytes the worst case (every token sends a row to every expert device); the bytes a ragged exchange
moves are estimated as that x r / G (G expert devices; r the expert devices a token reaches on
average when its experts are drawn uniformly, `expected_rows_per_token`). With `placement` (the
placement.json of `omnimoe placement`, `omnimoe plan --placement FILE`) r is instead what the run's
held-out tokens measured, per layer and averaged, under the identity, random and learned placements
(`placement_expected_bytes`); the placement's G must be the mesh's expert devices.
"""
import dataclasses
import math
import re

import jax
import numpy as np

from omnimoe.model.config import CONTEXT_PARALLEL as CONTEXT_STRATEGIES
from omnimoe.train import config as config_lib
from omnimoe.train.config import Config

PLATFORMS = ("cpu", "gpu", "tpu")
COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_OP = re.compile(r"=\s*(\(.*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+(" + "|".join(COLLECTIVES)
                 + r")(?:-start)?\(")
_SHAPE = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Bytes of the results of each kind of collective in an HLO module (per device)."""
  out = {k: 0 for k in COLLECTIVES}
  for shape, kind in _OP.findall(hlo_text):
    for dtype, dims in _SHAPE.findall(shape):
      n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
      out[kind] += n * _DTYPE_BYTES.get(dtype, 4)
  return out


_GATHER = re.compile(r"=\s*(\(.*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+all-gather(?:-start)?\(")


def whole_row_gathers(hlo_text: str, seq_len: int) -> int:
  """All-gathers whose result has a dimension of `seq_len`: a device gathering a whole row's
  positions (what context parallelism's all_gather does to K/V, and ring never does)."""
  count = 0
  for shape in _GATHER.findall(hlo_text):
    dims = [d for _, ds in _SHAPE.findall(shape) for d in ds.split(",") if d]
    count += any(int(d) == seq_len for d in dims)
  return count


def _bytes_per_device(tree, shardings) -> int:
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
    total += math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
  return total


def model_flops_per_token(cfg: Config, params) -> float:
  """6 x active matmul parameters + causal attention, forward + backward (see module docstring)."""
  moe, m = cfg.model.moe, cfg.model
  k = moe.top_k if moe.router == "topk" else moe.target_active_fraction * moe.num_experts
  active = 0.0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    if leaf.ndim < 2 or name.startswith("embed/"):   # norms; embedding lookups and projections
      continue
    n = math.prod(leaf.shape)
    active += n * k / moe.num_experts if "/moe/w_" in name else n
  return 6 * active + 6 * m.num_layers * m.num_heads * m.head_dim * cfg.data.seq_len


def expected_rows_per_token(moe, groups: int) -> float:
  """Expert devices a token reaches on average when its k experts are k distinct experts drawn
  uniformly (balanced routing): G x (1 - C(E - E/G, k) / C(E, k)); at most max_groups when the
  routing groups are the expert devices."""
  E = moe.num_experts
  k = max(1, round(moe.top_k if moe.router == "topk" else moe.target_active_fraction * E))
  rows = groups * (1 - math.comb(E - E // groups, k) / math.comb(E, k))
  if moe.max_groups and moe.num_groups == groups:
    rows = min(rows, moe.max_groups)
  return rows


def check_placement(cfg: Config, placement: dict) -> None:
  """A placement of the run's experts into as many groups as the mesh has expert devices."""
  from omnimoe.model.expert_parallel import expert_groups
  from omnimoe.train.mesh import make_mesh
  G = expert_groups(make_mesh(cfg.mesh), cfg.model.moe.num_experts)
  E = len(placement["permutations"][0])
  if placement["groups"] != G or E != cfg.model.moe.num_experts:
    raise config_lib.ConfigError(
        f"--placement groups {E} experts into {placement['groups']}, but this config's mesh splits "
        f"{cfg.model.moe.num_experts} experts over {G} expert devices; set mesh.within_rack.expert="
        f"{placement['groups']} (or place with --groups {G})")


def plan(cfg: Config, platform: str = "cpu", placement: dict | None = None) -> dict:
  """Compiles the train step for `cfg`'s mesh on the devices present and returns the figures,
  with the MoE dispatch `platform` would choose (see the module docstring)."""
  from omnimoe.model import expert_parallel
  if platform not in PLATFORMS:
    raise ValueError(f"--platform must be one of {', '.join(PLATFORMS)}, got {platform!r}")
  if placement is not None:
    check_placement(cfg, placement)
  target = expert_parallel.Platform(platform, emulate_ragged=platform != "cpu")
  mesh, setup, compiled = _compile(cfg, target)
  b, l = cfg.train.batch_size, cfg.data.seq_len
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  devices = mesh.devices.size
  params = setup.abstract_state["params"]
  moe = cfg.model.moe
  dispatch = expert_parallel.resolve_dispatch(moe.dispatch, mesh, moe.num_experts, target)
  G = expert_parallel.expert_groups(mesh, moe.num_experts)
  collectives = collective_bytes(compiled.as_text())
  out = {
      "platform": platform,
      "dispatch": dispatch,
      "mesh": dict(mesh.shape),
      "devices": devices,
      "parameters": sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
      "param_bytes_per_device": _bytes_per_device(params, setup.shardings["params"]),
      "optimizer_bytes_per_device": _bytes_per_device(setup.abstract_state["opt_state"],
                                                      setup.shardings["opt_state"]),
      "ema_bytes_per_device": (_bytes_per_device(setup.abstract_state["ema"], setup.shardings["ema"])
                               if "ema" in setup.abstract_state else 0),   # train.ema_decay
      "activation_bytes_per_device": int(memory.temp_size_in_bytes),
      "flops_per_token": float(cost.get("flops", 0.0)) * devices / (b * l),
      "model_flops_per_token": model_flops_per_token(cfg, params),
      "tokens_per_step": b * l,
      "collective_bytes_per_device_per_step": collectives,
      "context_parallel": cfg.model.context_parallel,
      "whole_row_gathers": whole_row_gathers(compiled.as_text(), l) if mesh.shape["context"] > 1
                           else 0,
  }
  if dispatch == "ragged_all_to_all":
    share = expected_rows_per_token(moe, G) / G
    out["ragged_all_to_all_expected_bytes"] = int(collectives["all-to-all"] * share)
    if placement is not None:
      out["placement_expected_bytes"] = {
          name: int(collectives["all-to-all"] * placement["mean"][name]["groups_per_token"] / G)
          for name in ("identity", "random", "learned")}
  return out


def length_table(cfg: Config, lengths, platform: str = "cpu") -> list[dict]:
  """`plan` of `cfg` at each sequence length under each context-parallel strategy: rows of
  (seq_len, strategy, per-device bytes, collective-permute bytes, whole-row gathers)."""
  rows = []
  for seq_len in lengths:
    for strategy in CONTEXT_STRATEGIES:
      variant = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=seq_len),
                                    model=dataclasses.replace(cfg.model, context_parallel=strategy))
      config_lib.validate(variant)
      p = plan(variant, platform)
      rows.append({"seq_len": seq_len, "context_parallel": strategy,
                   "activation_bytes_per_device": p["activation_bytes_per_device"],
                   "total_bytes_per_device": _total(p),
                   "collective_permute_bytes": p["collective_bytes_per_device_per_step"][
                       "collective-permute"],
                   "whole_row_gathers": p["whole_row_gathers"]})
  return rows


def describe_lengths(rows: list[dict]) -> str:
  lines = ["| tokens | context_parallel | activations / device | params + optimizer + activations "
           "| collective-permute / step | all-gathers of whole rows |",
           "|---:|:---|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['seq_len']:,} | {r['context_parallel']} | "
                 f"{_gib(r['activation_bytes_per_device'])} | {_gib(r['total_bytes_per_device'])} | "
                 f"{_gib(r['collective_permute_bytes'])} | {r['whole_row_gathers']} |")
  return "\n".join(lines)


def _total(p: dict) -> int:
  return (p["param_bytes_per_device"] + p["optimizer_bytes_per_device"]
          + p.get("ema_bytes_per_device", 0) + p["activation_bytes_per_device"])


def _compile(cfg: Config, target):
  """(mesh, setup, the compiled train step): `cfg`'s step on its mesh, its model built for
  `target` (model.expert_parallel.Platform), lowered with abstract inputs."""
  from omnimoe import data
  from omnimoe.train.mesh import batch_sharding, check_batch, make_mesh
  from omnimoe.train.state import make_setup
  from omnimoe.train.step import make_train_step

  mesh = make_mesh(cfg.mesh)
  check_batch(mesh, cfg.train.batch_size, microbatches=cfg.train.microbatches)
  info = data.dataset_info(cfg.data, cfg.train.seed)
  setup = make_setup(cfg, mesh, info, target)
  step = make_train_step(cfg, setup, batch_sharding(mesh, cfg.data.seq_len))
  b, l, f = cfg.train.batch_size, cfg.data.seq_len, info.feature_dim
  shapes = {"tokens": ((b, l), np.int32), "features": ((b, l, f), np.float32),
            "modality": ((b, l), np.int8), "segment_ids": ((b, l), np.int32),
            "positions": ((b, l, 3), np.int32), "targets": ((b, l), np.int32),
            "loss_weights": ((b, l), np.float32)}
  if mesh.shape["context"] > 1 and cfg.train.context_balance:   # train/context_batch.py
    shapes["order"] = ((b, l), np.int32)
  batch = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       setup.abstract_state, setup.shardings)
  return mesh, setup, step.lower(state, batch).compile()


def _gib(n: int) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def describe(p: dict) -> str:
  mesh = " x ".join(f"{k} {v}" for k, v in p["mesh"].items() if v > 1) or "one device"
  ragged = "ragged_all_to_all_expected_bytes" in p
  bound = " (an upper bound: ragged_all_to_all emulated with padded copies)" if ragged else ""
  lines = [f"mesh: {mesh} ({p['devices']} devices)",
           f"MoE dispatch:              {p['dispatch']} (as chosen on {p['platform']})",
           f"parameters:                {p['parameters'] / 1e6:.1f} M",
           f"params per device:         {_gib(p['param_bytes_per_device'])}",
           f"optimizer per device:      {_gib(p['optimizer_bytes_per_device'])}",
           f"weight average per device: {_gib(p['ema_bytes_per_device'])} (train.ema_decay)",
           f"activations per device:    {_gib(p['activation_bytes_per_device'])} (compiled step's "
           f"temporaries){bound}",
           f"FLOPs per token:           {p['model_flops_per_token'] / 1e9:.3f} GFLOP (model count, "
           f"forward + backward); XLA's count {p['flops_per_token'] / 1e9:.3f} GFLOP",
           f"tokens per step:           {p['tokens_per_step']}",
           f"total per device:          {_gib(_total(p))} (params + optimizer + activations)",
           "collectives per device per step:"]
  for k, v in p["collective_bytes_per_device_per_step"].items():
    note = "  (emulated ragged exchange: the worst case)" if ragged and k == "all-to-all" else ""
    lines.append(f"  {k:<20s} {_gib(v)}{note}")
  if p["mesh"].get("context", 1) > 1:
    lines.append(f"context parallelism:       {p['context_parallel']}: "
                 f"{p['whole_row_gathers']} all-gathers of whole rows (a row's K/V on every "
                 f"context device)"
                 if p["whole_row_gathers"] else
                 f"context parallelism:       {p['context_parallel']}: no all-gather of a whole row; "
                 f"K/V move by collective-permute")
  if ragged:
    lines.append(f"  ragged_all_to_all    {_gib(p['ragged_all_to_all_expected_bytes'])} (expected "
                 "under balanced routing: the all-to-all x devices a token reaches / expert devices)")
  for name, n in p.get("placement_expected_bytes", {}).items():
    lines.append(f"  ragged, {name + ' placement':<18s} {_gib(n)} (devices a held-out token reached, "
                 "measured by omnimoe placement)")
  return "\n".join(lines)

"""Input-pipeline throughput against the tiny model's train steps, measured in one run.

    python -m bench.data --json runs/bench_data.json        (or python bench/data.py ...)
    python -m bench.data --batches 10 --steps 3 model.num_layers=2     # overrides: as `omnimoe`

Pipelines timed (each alone, consumer pulling as fast as it can, prefetch as configured):
- `default`: the default dataset (its three cached prepared folders; `first_batch_s` includes
  building them when the cache is cold);
- `prepared`: a folder `omnimoe prepare` builds from files the bench writes first
  (data/demo_files.py: digit PNGs, DTMF WAVs, text lines; `--examples` of them).
Model: `--steps` timed train steps (after one compile step) of the same config through
train/step.py's `make_train_step`, on this process's devices, fed real batches.
The ratio is pipeline batches/s over model steps/s: how many times faster the input is produced
than consumed. Goal >= 5 (the input never stalls training). Both share this machine's cores, so
the ratio of a run where they overlap is lower than the one measured apart.

examples/s counts packed segments; tokens/s counts non-padding positions; fill is their share of
batch_size x seq_len.
"""
import sys

if __package__ in (None, ""):   # `python bench/data.py`: import the repo's `data`, not this file
  import pathlib
  sys.path[0] = str(pathlib.Path(__file__).resolve().parent.parent)

import argparse
import dataclasses
import json
import pathlib
import tempfile
import time

import jax
import numpy as np

from omnimoe import data
from omnimoe.data.builtin import demo_files
from omnimoe.data.prepare import write as prepare
from omnimoe.data.config import Source
from omnimoe.train import config as config_lib

GOAL = 5.0


def time_pipeline(data_cfg, *, batch_size: int, seed: int, batches: int) -> dict:
  it = data.train_iterator(data_cfg, batch_size=batch_size, seed=seed)
  t0 = time.perf_counter()
  next(it)                                  # builds the dataset / opens the shards
  first_s = time.perf_counter() - t0
  examples = tokens = 0
  t0 = time.perf_counter()
  for _ in range(batches):
    batch = next(it)
    examples += int(batch["segment_ids"].max(axis=1).sum())
    tokens += int((batch["segment_ids"] > 0).sum())
  seconds = time.perf_counter() - t0
  it.close()
  return {"batches_per_s": batches / seconds, "examples_per_s": examples / seconds,
          "tokens_per_s": tokens / seconds, "fill": tokens / (batches * batch_size * data_cfg.seq_len),
          "first_batch_s": first_s, "batches": batches}


def time_train_steps(cfg, *, steps: int) -> dict:
  from omnimoe.train.mesh import batch_sharding, global_batch, make_mesh
  from omnimoe.train.state import init_state, make_setup
  from omnimoe.train.step import make_train_step
  mesh = make_mesh()
  info = data.dataset_info(cfg.data, cfg.train.seed)
  setup = make_setup(cfg, mesh, info)
  state = init_state(cfg, setup)
  step = make_train_step(cfg, setup, batch_sharding(mesh))
  it = data.train_iterator(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
  batches = [global_batch(next(it), mesh) for _ in range(steps + 1)]
  it.close()
  t0 = time.perf_counter()
  state, metrics = step(state, batches[0])
  jax.block_until_ready((state, metrics))
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for batch in batches[1:]:
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  seconds = time.perf_counter() - t0
  return {"steps_per_s": steps / seconds, "step_ms": 1e3 * seconds / steps,
          "compile_s": compile_s, "steps": steps, "devices": len(jax.devices()),
          "platform": jax.devices()[0].platform}


def run(cfg, *, batches: int, steps: int, examples: int, workdir: pathlib.Path) -> dict:
  demo = demo_files.write_demo(workdir / "files", examples=examples)
  t0 = time.perf_counter()
  card = prepare.prepare(demo, workdir / "prepared", cfg.data)
  prepare_s = time.perf_counter() - t0
  prepared_cfg = dataclasses.replace(cfg.data, sources=(Source(str(workdir / "prepared")),))
  b, seed = cfg.train.batch_size, cfg.train.seed
  pipelines = {"default": time_pipeline(dataclasses.replace(cfg.data, sources=()),
                                        batch_size=b, seed=seed, batches=batches),
               "prepared": time_pipeline(prepared_cfg, batch_size=b, seed=seed, batches=batches)}
  model = time_train_steps(cfg, steps=steps)
  for row in pipelines.values():
    row["ratio_to_train_steps"] = row["batches_per_s"] / model["steps_per_s"]
  return {"batch_size": b, "seq_len": cfg.data.seq_len, "goal_ratio": GOAL, "model": model,
          "pipelines": pipelines,
          "prepare": {"examples": card["examples"]["total"], "seconds": prepare_s,
                      "examples_per_s": card["examples"]["total"] / prepare_s}}


def table(result: dict) -> str:
  m = result["model"]
  lines = [f"batch {result['batch_size']} x {result['seq_len']}; tiny model train step "
           f"{m['step_ms']:.0f} ms = {m['steps_per_s']:.2f} steps/s on {m['devices']} "
           f"{m['platform']} device(s) (compile {m['compile_s']:.1f} s)",
           "",
           "| pipeline | batches/s | examples/s | tokens/s | fill | batches/s / steps/s |",
           "|---|---|---|---|---|---|"]
  for name, r in result["pipelines"].items():
    verdict = "ok" if r["ratio_to_train_steps"] >= result["goal_ratio"] else "BELOW GOAL"
    lines.append(f"| {name} | {r['batches_per_s']:.1f} | {r['examples_per_s']:.0f} | "
                 f"{r['tokens_per_s']:.0f} | {r['fill']:.2f} | {r['ratio_to_train_steps']:.1f}x "
                 f"({verdict}, goal >= {result['goal_ratio']:.0f}x) |")
  p = result["prepare"]
  lines += ["", f"omnimoe prepare: {p['examples']} examples in {p['seconds']:.1f} s "
                f"({p['examples_per_s']:.0f} examples/s, imports excluded)"]
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
  parser.add_argument("--config", help="YAML config (default: the built-in tiny run)")
  parser.add_argument("--batches", type=int, default=30, help="timed batches per pipeline")
  parser.add_argument("--steps", type=int, default=5, help="timed train steps")
  parser.add_argument("--examples", type=int, default=300, help="demo examples to prepare")
  parser.add_argument("--json", help="write the result here")
  args = parser.parse_args(argv)
  cfg = config_lib.load(args.config, args.overrides)
  with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
    result = run(cfg, batches=args.batches, steps=args.steps, examples=args.examples,
                 workdir=pathlib.Path(tmp))
  print(table(result), flush=True)
  if args.json:
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
  return result


if __name__ == "__main__":
  main()

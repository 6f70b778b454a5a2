"""Train-step time and compiled memory of the tiny model at long rows, batch 1: one device, and
context parallelism over 8 simulated devices.

    python -m bench.long_context --json OUT.json                  # 2K, 8K, 32K; remat none, full;
                                                                  # context 8: all_gather, ring
    python -m bench.long_context --lengths 2048 8192 --repeats 3 model.num_layers=2   # overrides

Each row is (length, remat, loss_chunk) on `devices` = 1 (`exchange` = "none"), then, with
`--context C` (default 8; 0 = none), the same lengths with remat `--context-remat` on a mesh of
`context` = C devices (simulated CPU devices: the script asks XLA for 8 when run as a program)
under each `model.context_parallel` strategy (`exchange` = all_gather or ring; rows balanced,
train/context_batch.py). Memory of such a row is per device (the SPMD program's). The
model is configs/tiny.yaml (plus overrides, as `omnimoe`) with `data.seq_len` = the length,
`train.batch_size` = 1 and `model.attention=blockwise`; the input is a random batch of the data
contract (model/synthetic.py), so no dataset is read: by default one document fills the row (all
but its last 3 positions, padding), so attention does all its causal work; `--doc-len N` packs
documents of N tokens instead (block skipping then removes most of attention's work). The train
step (train/step.py: forward, backward, AdamW update) is lowered and compiled ahead of time on a
1-device mesh; per row: compile seconds (lower + compile), the median of `--repeats` timed steps
(the first step of a compiled program runs slower: 1 repeat overstates the time), and XLA's
compiled memory analysis of the step (`compiled.memory_analysis()`): `peak` below is
temp + argument + output bytes (an upper bound of what the step holds at once: the donated state
is counted both as argument and as output), with temp alone beside it.

Prints a markdown table and, for each remat policy, the ratios from the second-to-last length to
the last (8K -> 32K by default): peak memory (goal: at most 1.125x the length ratio, 4.5x for 4x
tokens) and step time against the ratio of causal attention FLOPs ((L2 / L1)^2, 16x for 4x tokens).
"""
import argparse
import json
import os
import pathlib
import statistics
import time

if __name__ == "__main__" and "device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")

import jax

from omnimoe import data
from omnimoe.data.config import feature_dim
from omnimoe.data.vocab import Vocab
from omnimoe.model.synthetic import synthetic_batch
from omnimoe.train import config as config_lib
from omnimoe.train import context_batch
from omnimoe.train.mesh import batch_sharding, global_batch, make_mesh
from omnimoe.train.state import init_state, make_setup
from omnimoe.train.step import make_train_step

MEMORY_SLACK = 1.125       # goal: peak memory grows at most 1.125x the length ratio (4.5x for 4x)


def row_config(overrides, length: int, remat: str, loss_chunk: int, context: int = 1,
               exchange: str = "none"):
  mesh = []
  if context > 1:
    mesh = ["mesh.within_rack.data=1", f"mesh.within_rack.context={context}",
            f"model.context_parallel={exchange}"]
  return config_lib.load(None, [*overrides, f"data.seq_len={length}", "train.batch_size=1",
                                "model.attention=blockwise", f"model.remat={remat}",
                                f"train.loss_chunk={loss_chunk}", *mesh])


def measure(cfg, repeats: int, doc_len: int = 0) -> dict:
  """Compile seconds, step times and compiled memory (per device) of `cfg`'s train step on
  `mesh.within_rack.context` devices."""
  context = cfg.mesh.within_rack.context
  mesh = make_mesh(cfg.mesh, jax.devices()[:context])
  info = data.DatasetInfo(Vocab.from_config(cfg.data), feature_dim(cfg.data))
  setup = make_setup(cfg, mesh, info)
  state = init_state(cfg, setup)
  doc = doc_len or cfg.data.seq_len
  host = synthetic_batch(1, cfg.data.seq_len, info.vocab.size, info.feature_dim,
                         seed=cfg.train.seed, min_doc=doc, max_doc=doc)
  batch = global_batch(context_batch.prepare(host, context, cfg.train.context_balance), mesh)
  t0 = time.perf_counter()
  step = make_train_step(cfg, setup, batch_sharding(mesh, cfg.data.seq_len))
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  times, loss = [], None
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    loss = float(jax.block_until_ready(metrics["loss"]))
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  temp, arg, out = (int(mem.temp_size_in_bytes), int(mem.argument_size_in_bytes),
                    int(mem.output_size_in_bytes))
  return {"compile_s": compile_s, "step_s": statistics.median(times), "step_times_s": times,
          "loss": loss, "documents": int(host["segment_ids"].max()),
          "temp_bytes": temp, "argument_bytes": arg, "output_bytes": out,
          "alias_bytes": int(mem.alias_size_in_bytes), "peak_bytes": temp + arg + out,
          "platform": jax.devices()[0].platform}


def _mib(n: int) -> str:
  return f"{n / 2**20:,.1f}"


def table(rows) -> str:
  lines = ["| tokens | devices | exchange | remat | loss_chunk | compile s | step s "
           "| peak MiB (temp+arg+out) | temp MiB |",
           "|---:|---:|:---|:---|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['tokens']:,} | {r['devices']} | {r['exchange']} | {r['remat']} | "
                 f"{r['loss_chunk']} | {r['compile_s']:.1f} | {r['step_s']:.2f} | "
                 f"{_mib(r['peak_bytes'])} | {_mib(r['temp_bytes'])} |")
  return "\n".join(lines)


def ratios(rows) -> list[dict]:
  """Per (remat policy, exchange): growth of peak memory and step time from the second-to-last
  length to the last, with the goals (memory <= MEMORY_SLACK x length ratio; time vs causal
  attention FLOPs)."""
  lengths = sorted({r["tokens"] for r in rows})
  if len(lengths) < 2:
    return []
  short, long = lengths[-2:]
  out = []
  for remat, exchange in dict.fromkeys((r["remat"], r["exchange"]) for r in rows):
    a, b = ([r for r in rows if (r["remat"], r["exchange"], r["tokens"]) == (remat, exchange, n)][0]
            for n in (short, long))
    out.append({"remat": remat, "exchange": exchange, "devices": a["devices"],
                "from": short, "to": long,
                "memory_ratio": b["peak_bytes"] / a["peak_bytes"],
                "memory_goal": MEMORY_SLACK * long / short,
                "time_ratio": b["step_s"] / a["step_s"],
                "attention_flops_ratio": (long / short) ** 2})
  return out


def ratio_lines(growth) -> str:
  lines = []
  for g in growth:
    goal, flops = g["memory_goal"], g["attention_flops_ratio"]
    mem_ok = "ok" if g["memory_ratio"] <= goal else "OVER GOAL"
    time_ok = "ok" if g["time_ratio"] <= flops else "GROWS FASTER"
    where = "1 device" if g["exchange"] == "none" else f"{g['devices']} devices, {g['exchange']}"
    lines.append(f"{where}, remat {g['remat']}, {g['from']:,} -> {g['to']:,} tokens: peak memory "
                 f"{g['memory_ratio']:.2f}x ({mem_ok}, goal <= {goal:.2f}x); step time "
                 f"{g['time_ratio']:.2f}x (causal attention FLOPs {flops:.0f}x, {time_ok})")
  return "\n".join(lines)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (as omnimoe)")
  p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
  p.add_argument("--remat", nargs="+", default=["none", "full"], help="model.remat policies")
  p.add_argument("--loss-chunk", type=int, default=1024, help="train.loss_chunk (0 = whole logits)")
  p.add_argument("--repeats", type=int, default=1, help="timed steps per row (median)")
  p.add_argument("--doc-len", type=int, default=0,
                 help="tokens per packed document (0 = one document per row)")
  p.add_argument("--context", type=int, default=8,
                 help="context-parallel rows on this many devices (0 = none)")
  p.add_argument("--context-remat", default="none", help="model.remat of the context rows")
  p.add_argument("--json", type=pathlib.Path, help="write {rows, ratios} here")
  args = p.parse_args(argv)
  if args.repeats < 1:
    p.error(f"--repeats must be >= 1, got {args.repeats}")
  if args.doc_len < 0:
    p.error(f"--doc-len must be >= 0 (0 = one document per row), got {args.doc_len}")
  if args.context and not 1 < args.context <= len(jax.devices()):
    p.error(f"--context must be 0 or 2..{len(jax.devices())} (the devices JAX has), "
            f"got {args.context}")
  kinds = [(1, "none", remat) for remat in args.remat]
  if args.context:
    kinds += [(args.context, ex, args.context_remat) for ex in ("all_gather", "ring")]
  rows = []
  for context, exchange, remat in kinds:
    for length in args.lengths:
      cfg = row_config(args.overrides, length, remat, args.loss_chunk, context, exchange)
      row = {"tokens": length, "remat": remat, "loss_chunk": args.loss_chunk, "devices": context,
             "exchange": exchange, "batch_size": 1, "doc_len": args.doc_len,
             **measure(cfg, args.repeats, args.doc_len)}
      rows.append(row)
      print(f"{length} tokens, {context} device(s), {exchange}, remat {remat}: compile "
            f"{row['compile_s']:.1f} s, step {row['step_s']:.2f} s, peak "
            f"{_mib(row['peak_bytes'])} MiB", flush=True)
  result = {"rows": rows, "ratios": ratios(rows), "overrides": args.overrides,
            "peak": "XLA compiled memory_analysis(): temp + argument + output bytes"}
  print(table(rows))
  print(ratio_lines(result["ratios"]), flush=True)
  if args.json:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
  return result


if __name__ == "__main__":
  main()

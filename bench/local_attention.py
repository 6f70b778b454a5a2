"""Train-step time of the needle model (configs/needle.yaml) with its first layer local (sliding
window) against both layers global, side by side in one process (forward + backward, one document
per row).

    python -m bench.local_attention --seq 2048 --batch 4 --json local_attention.json

Prints a table (median of --steps timed steps after a compile) and the ratio global / local.
Run on an otherwise idle machine."""
import argparse
import dataclasses
import json
import statistics

import jax.numpy as jnp

from bench.step import step_time
from omnimoe.model.synthetic import synthetic_batch
from omnimoe.train import config as config_lib


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--window", type=int, default=128)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  base = config_lib.load("needle").model
  V, F = 512, 24
  batch = {k: jnp.asarray(v) for k, v in synthetic_batch(args.batch, args.seq, V, F).items()}
  batch["segment_ids"] = jnp.ones((args.batch, args.seq), jnp.int32)    # one document per row
  variants = {"global": dataclasses.replace(base, local_layers=(), attention_window=0),
              "local first layer": dataclasses.replace(base, local_layers=(0,),
                                                       attention_window=args.window)}
  rows = []
  for name, cfg in variants.items():
    loss, compile_s, times = step_time(cfg, batch, V, F, args.steps)
    rows.append({"variant": name, "seq": args.seq, "batch": args.batch, "window": args.window,
                 "loss": loss, "compile_s": compile_s, "step_s": statistics.median(times),
                 "step_times_s": times})
    print(f"{name:18s} seq {args.seq:6d}  step median {rows[-1]['step_s'] * 1e3:7.0f} ms  "
          f"{args.batch * args.seq / rows[-1]['step_s']:8.0f} tokens/s", flush=True)
  result = {"rows": rows, "global_over_local": rows[0]["step_s"] / rows[1]["step_s"]}
  print(f"global / local step time: {result['global_over_local']:.2f}x")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()

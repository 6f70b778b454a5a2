"""One command for the first lent GPU: the model shape of the README's NVL72 plan
(configs/rack_nvl72.yaml: 8 layers, d 1024, 64 experts top-8 of width 512; 0.83B parameters, 0.12B
active per token, with the default dataset's 512-row vocabulary) at sequence length 4096 on one
GPU, bfloat16 compute with float32 masters, omnimoe against Hugging Face's Qwen3-MoE in the same run (bench/peer.py's workers, each in
its own process): tokens/s, MFU against the datasheet peak (train/mfu.py), peak memory.

    python -m bench.gpu --json OUT.json [--batch 4] [--steps 5]

Sized to finish within 10 minutes on an H100/H200 (two compiles, 7 steps per side). Needs jax,
torch and transformers, not the data pipeline (grain, array-record) nor tokamax: on a machine
without a GPU it says so and exits 2.
"""
import argparse
import sys

import jax

from bench import peer


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", help="write the results here")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--remat", default="none", choices=["none", "full", "dots"],
                      help="omnimoe's model.remat (if the batch does not fit)")
  args = parser.parse_args(argv)
  if jax.default_backend() != "gpu":
    print(f"bench/gpu.py needs a GPU; jax sees {jax.default_backend()}", file=sys.stderr)
    return 2
  seq, extra = 4096, [f"model.remat={args.remat}"]
  common = ["--shapes", "nvl72", "--dtype", "bfloat16", "--batch", str(args.batch),
            "--seq", str(seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--repeats", "1", "--peer-experts", "grouped_mm", *[f"--extra={e}" for e in extra]]
  peer.main([*common, *(["--json", args.json] if args.json else [])])
  return 0


if __name__ == "__main__":
  sys.exit(main())

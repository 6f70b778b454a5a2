"""Step-time benchmark of the decoder on this machine (forward + backward of a mean CE loss).

    python bench/step.py blocked:128 blocked:256 dense ragged_dot      (or python -m bench.step)

Each argument is `backend[:block_rows]`; the default tiny shape is d_model 128, 4 layers, 8 experts
top-2, vocab 512, batch 32 x 128. Prints compile time and the median of `--steps` timed steps.
Run the variants in one process, one after the other, on an otherwise idle machine.
"""
import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from omnimoe.model.config import ModelConfig
from omnimoe.model.decoder import Decoder
from omnimoe.model.synthetic import synthetic_batch


def step_time(cfg: ModelConfig, batch: dict, vocab_size: int, feature_dim: int, steps: int):
  graphdef, params = nnx.split(Decoder(cfg, vocab_size=vocab_size, feature_dim=feature_dim,
                                       rngs=nnx.Rngs(0)))

  def loss_fn(params, batch):
    logits, aux = nnx.merge(graphdef, params)(batch)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    w = batch["loss_weights"]
    return (jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)
            + cfg.moe.load_balance_coef * aux["load_balance_loss"]
            + cfg.moe.z_loss_coef * aux["router_z_loss"])

  step = jax.jit(jax.value_and_grad(loss_fn))
  t0 = time.perf_counter()
  jax.block_until_ready(step(params, batch))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    loss, grads = step(params, batch)
    jax.block_until_ready(grads)
    times.append(time.perf_counter() - t0)
  return float(loss), compile_s, times


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("variants", nargs="*",
                      default=["blocked:128", "blocked:256", "dense", "ragged_dot"])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args(argv)
  V, F = 512, 24
  batch = {k: jnp.asarray(v) for k, v in synthetic_batch(args.batch, args.seq, V, F).items()}
  tokens = args.batch * args.seq
  for variant in args.variants:
    backend, _, rows = variant.partition(":")
    base = ModelConfig()
    cfg = dataclasses.replace(base, moe=dataclasses.replace(
        base.moe, backend=backend, block_rows=int(rows or base.moe.block_rows)))
    loss, compile_s, times = step_time(cfg, batch, V, F, args.steps)
    med = statistics.median(times)
    print(f"{variant:14s} loss {loss:.4f}  compile {compile_s:5.1f}s"
          f"  step median {med * 1e3:6.0f} ms  min {min(times) * 1e3:6.0f} ms"
          f"  {tokens / med:8.0f} tokens/s", flush=True)


if __name__ == "__main__":
  main()

"""Decoding speed: one new token with the KV cache vs recomputing the whole sequence, side by side
in one process, at several contexts.

    python bench/decode.py --json OUT.json                 # contexts 128, 1024, 4096
    python bench/decode.py --contexts 128 1024 --repeats 5

The model is the default run's (model/config.py defaults: 4 layers, d_model 128, 8 experts top-2,
the default vocabulary of 512 ids), with random weights: speed does not depend on training. At a
context of C positions:
  cached     one jitted `Decoder.decode` call of 1 position against a cache of C slots holding
             C - 1 (what each step of train/generate.py runs);
  recompute  one jitted forward over all C positions, the head on the last one only (what decoding
             without a cache runs per token; the evaluation did this before the cache).
tokens/s = 1 / the median of `--repeats` timed calls after a warm-up call. Also the cache's
bytes per position (keys and values of every layer, model/kv_cache.py) and its size at C.
Prints a table; `--json` writes rows {"context", "cached_tokens_per_s", "recompute_tokens_per_s",
"speedup", "cache_bytes_per_token", "cache_bytes", "backend"}.
"""
import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.timing import median_seconds
from omnimoe.model import kv_cache
from omnimoe.model.config import ModelConfig
from omnimoe.model.decoder import Decoder, head_logits

VOCAB, FEATURES = 512, 24


def _batch(C: int, seed: int = 0) -> dict:
  r = np.random.default_rng(seed)
  pos = np.repeat(np.arange(C, dtype=np.int32)[None, :, None], 3, axis=2)
  return {"tokens": r.integers(4, 260, (1, C)).astype(np.int32),
          "features": np.zeros((1, C, FEATURES), np.float32),
          "modality": np.ones((1, C), np.int8), "segment_ids": np.ones((1, C), np.int32),
          "positions": pos}


def measure(C: int, cfg: ModelConfig, repeats: int) -> dict:
  graphdef, params = nnx.split(Decoder(cfg, vocab_size=VOCAB, feature_dim=FEATURES,
                                       rngs=nnx.Rngs(0)))
  batch = _batch(C)

  @jax.jit
  def recompute(params, batch):
    model = nnx.merge(graphdef, params)
    h, _ = model.hidden(batch)
    return head_logits(h[:, -1:], model.head_DxV[...])

  @jax.jit
  def prefill(params, batch):
    cache = kv_cache.init_cache(cfg, 1, C)
    return nnx.merge(graphdef, params).decode(batch, cache)[2]

  @jax.jit
  def step(params, batch, cache):
    return nnx.merge(graphdef, params).decode(batch, cache)[0]

  head = {k: v[:, :C - 1] for k, v in batch.items()}
  last = {k: v[:, C - 1:] for k, v in batch.items()}
  cache = prefill(params, head)
  np.testing.assert_allclose(np.asarray(step(params, last, cache)),
                             np.asarray(recompute(params, batch)), rtol=1e-4, atol=1e-4)
  cached_s = median_seconds(lambda: step(params, last, cache), repeats,
                               sync=jax.block_until_ready)[0]
  recompute_s = median_seconds(lambda: recompute(params, batch), repeats,
                                  sync=jax.block_until_ready)[0]
  per_token = kv_cache.bytes_per_token(cfg)
  return {"context": C, "cached_tokens_per_s": 1 / cached_s,
          "recompute_tokens_per_s": 1 / recompute_s, "speedup": recompute_s / cached_s,
          "cache_bytes_per_token": per_token, "cache_bytes": per_token * C,
          "backend": jax.default_backend()}


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--json", type=pathlib.Path, help="write the rows here")
  a = p.parse_args(argv)
  cfg = ModelConfig()
  rows = []
  print(f"{'context':>8} {'cached tok/s':>13} {'recompute tok/s':>16} {'speedup':>8} "
        f"{'cache KiB':>10}")
  for C in a.contexts:
    r = measure(C, cfg, a.repeats)
    rows.append(r)
    print(f"{C:>8} {r['cached_tokens_per_s']:>13.1f} {r['recompute_tokens_per_s']:>16.1f} "
          f"{r['speedup']:>7.1f}x {r['cache_bytes'] / 1024:>10.1f}", flush=True)
  if a.json:
    a.json.write_text(json.dumps(rows, indent=1))
  return rows


if __name__ == "__main__":
  main()

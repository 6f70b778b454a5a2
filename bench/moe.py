"""Forward + backward time of one MoE layer as the number of experts grows (work per token fixed).

    python bench/moe.py --json OUT.json                    # 8, 32, 64, 256 experts, every backend
    python bench/moe.py --experts 8 256 --backends blocked --repeats 3

Fixed: tokens (default 16384), top-k (2), model width (128) and expert width (256), so the FLOPs per
token stay constant while the expert parameters grow 32x from 8 to 256 experts. Timed: one jitted
`value_and_grad` of sum(y * r) with respect to the layer's parameters and its input; the median of
`--repeats` runs after a compile-and-warm-up call (one run only when the warm-up took over
`--slow-s` seconds, which bounds the cost of the dense paths at many experts).

Backends: the grouped-matmul backends of `model.grouped_matmul` inside `model.moe.MoE` (`blocked`,
`ragged_dot`, `dense` = the every-expert oracle) and `onehot`, the textbook dense dispatch: every
expert on every token, combined with a [T, E] weight matrix that is zero off the top-k (computed in
chunks of 8 experts to bound memory). XLA:CPU runs ragged_dot densely and its memory grows with
E * tokens: where it would exceed `--max-gb` the row says "skipped" (ms null, with the reason).
Prints a table; `--json` writes rows {"experts", "backend", "ms"} (plus tokens, top_k, d_model,
expert_hidden, repeats, and "skipped" where skipped). Each row also has "cpu_ms": the median process
CPU time (user + system, all threads) of the same runs, which moves far less than wall time when
other jobs share the machine (it counts work, not waiting; it also counts work done in parallel).
"""
import argparse
import dataclasses
import json
import pathlib
import resource
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from omnimoe.model.config import MoEConfig
from omnimoe.model.moe import MoE
from omnimoe.model.router import top_k_routing

BACKENDS = ("blocked", "ragged_dot", "dense", "onehot")
ONEHOT_CHUNK = 8     # experts per einsum of the one-hot baseline


def onehot_moe(params: dict, x_TxD: jax.Array, top_k: int) -> jax.Array:
  """Every expert on every token, weighted by the renormalised top-k probabilities (0 elsewhere)."""
  E = params["w_gate_ExDxH"].shape[0]
  probs_TxE, expert_TxK, weight_TxK = top_k_routing(x_TxD @ params["router_DxE"], top_k)
  combine_TxE = jnp.einsum("tk,tke->te", weight_TxK, jax.nn.one_hot(expert_TxK, E))
  C = min(ONEHOT_CHUNK, E)

  def chunk(y_TxD, i):
    sl = lambda w: jax.lax.dynamic_slice_in_dim(w, i * C, C, axis=0)
    gate_CxTxH = jnp.einsum("td,cdh->cth", x_TxD, sl(params["w_gate_ExDxH"]))
    up_CxTxH = jnp.einsum("td,cdh->cth", x_TxD, sl(params["w_up_ExDxH"]))
    out_CxTxD = jnp.einsum("cth,chd->ctd", jax.nn.silu(gate_CxTxH) * up_CxTxH,
                           sl(params["w_down_ExHxD"]))
    w_TxC = jax.lax.dynamic_slice_in_dim(combine_TxE, i * C, C, axis=1)
    return y_TxD + jnp.einsum("ctd,tc->td", out_CxTxD, w_TxC), None

  y_TxD, _ = jax.lax.scan(jax.checkpoint(chunk), jnp.zeros_like(x_TxD), jnp.arange(E // C))
  return y_TxD


def make_step(backend: str, cfg: MoEConfig, d_model: int, tokens: int):
  """(jitted fn, args): fn(params, x, r) -> (loss, grads) for one backend."""
  moe_cfg = dataclasses.replace(cfg, backend="dense" if backend == "onehot" else backend)
  graphdef, params = nnx.split(MoE(d_model, moe_cfg, rngs=nnx.Rngs(0)))
  kx, kr = jax.random.split(jax.random.key(1))
  x_BxLxD = jax.random.normal(kx, (1, tokens, d_model))
  r_BxLxD = jax.random.normal(kr, (1, tokens, d_model))
  seg_BxL = jnp.ones((1, tokens), jnp.int32)

  if backend == "onehot":
    def loss(params, x, r):
      y = onehot_moe({k: v[...] for k, v in params.items()}, x[0], cfg.top_k)
      return jnp.sum(y * r[0])
  else:
    def loss(params, x, r):
      y, _ = nnx.merge(graphdef, params)(x, seg_BxL)
      return jnp.sum(y * r)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (params, x_BxLxD, r_BxLxD)


def _cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def time_one(fn, args, repeats: int, slow_s: float) -> tuple[float, float, int, float]:
  """(compile + first call s, median wall ms, timed runs, median process CPU ms)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  n = 1 if first > slow_s else repeats
  times, cpu = [], []
  for _ in range(n):
    c0, t0 = _cpu_s(), time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
    cpu.append(_cpu_s() - c0)
  return first, statistics.median(times) * 1e3, n, statistics.median(cpu) * 1e3


def ragged_dot_cpu_gb(experts: int, tokens: int, top_k: int, d_model: int, hidden: int) -> float:
  """XLA:CPU computes ragged_dot densely, every expert on every row: it held ~7 copies of an
  [E, T*k, max(D, H)] float32 array at its peak (14 GB measured at E=64, 16k tokens, top-2)."""
  return 7 * experts * tokens * top_k * max(d_model, hidden) * 4 / 2 ** 30


def run(experts, backends, *, tokens, top_k, d_model, expert_hidden, block_rows, repeats, slow_s,
        max_gb=8.0, log=print) -> list[dict]:
  rows = []
  for E in experts:
    cfg = MoEConfig(num_experts=E, top_k=top_k, expert_hidden=expert_hidden, block_rows=block_rows)
    for backend in backends:
      row = {"experts": E, "backend": backend, "ms": None, "tokens": tokens, "top_k": top_k,
             "d_model": d_model, "expert_hidden": expert_hidden, "repeats": 0}
      gb = ragged_dot_cpu_gb(E, tokens, top_k, d_model, expert_hidden)
      if backend == "ragged_dot" and jax.default_backend() == "cpu" and gb > max_gb:
        row["skipped"] = f"needs ~{gb:.0f} GB on XLA:CPU (--max-gb {max_gb:g})"
        log(f"  E={E:4d} {backend:10s}    skipped: {row['skipped']}")
      else:
        fn, args = make_step(backend, cfg, d_model, tokens)
        first, ms, n, cpu_ms = time_one(fn, args, repeats, slow_s)
        row.update(ms=round(ms, 2), repeats=n, cpu_ms=round(cpu_ms, 2))
        log(f"  E={E:4d} {backend:10s} {ms:10.1f} ms  (CPU {cpu_ms:.1f} ms; compile+first "
            f"{first:.1f} s, {n} runs)")
      rows.append(row)
  return rows


def table(rows: list[dict], key: str = "ms") -> str:
  """Markdown table of `key` (ms: wall, cpu_ms: process CPU): experts down, backends across, and
  each backend's growth from the first row."""
  backends = list(dict.fromkeys(r["backend"] for r in rows))
  experts = sorted({r["experts"] for r in rows})
  ms = {(r["experts"], r["backend"]): r[key] for r in rows if r.get(key) is not None}
  unit = "ms" if key == "ms" else "CPU ms"
  lines = ["| experts | " + " | ".join(f"{b} {unit}" for b in backends) + " |",
           "|---:|" + "---:|" * len(backends)]
  for E in experts:
    lines.append(f"| {E} | " + " | ".join(f"{ms[E, b]:.1f}" if (E, b) in ms else "skipped"
                                          for b in backends) + " |")
  lo, hi = experts[0], experts[-1]
  growth = [f"{ms[hi, b] / ms[lo, b]:.2f}x" if (lo, b) in ms and (hi, b) in ms else "-"
            for b in backends]
  lines.append(f"| growth {lo}->{hi} | " + " | ".join(growth) + " |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 64, 256])
  p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
  p.add_argument("--tokens", type=int, default=16384)
  p.add_argument("--top-k", type=int, default=2)
  p.add_argument("--d-model", type=int, default=128)
  p.add_argument("--expert-hidden", type=int, default=256)
  p.add_argument("--block-rows", type=int, default=MoEConfig.block_rows)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--slow-s", type=float, default=5.0,
                 help="time only once when compile + first call took longer than this")
  p.add_argument("--max-gb", type=float, default=8.0,
                 help="skip ragged_dot on CPU where it would need more memory than this")
  p.add_argument("--json", type=pathlib.Path, help="write the rows here")
  args = p.parse_args(argv)
  print(f"MoE layer fwd+bwd on {jax.devices()[0].device_kind}: {args.tokens} tokens, "
        f"top-{args.top_k}, d_model {args.d_model}, expert_hidden {args.expert_hidden}", flush=True)
  rows = run(args.experts, args.backends, tokens=args.tokens, top_k=args.top_k,
             d_model=args.d_model, expert_hidden=args.expert_hidden, block_rows=args.block_rows,
             repeats=args.repeats, slow_s=args.slow_s, max_gb=args.max_gb, log=lambda s: print(s, flush=True))
  print("wall time (median):")
  print(table(rows))
  print("process CPU time (median):")
  print(table(rows, "cpu_ms"))
  if args.json:
    args.json.write_text(json.dumps(rows, indent=1) + "\n")
  return rows


if __name__ == "__main__":
  main()

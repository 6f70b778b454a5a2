"""First light on an accelerator: every hardware path against an oracle, forward and gradients.

    python -m bench.accelerator_check [--json OUT.json] [--record] [--quick]

Runs on whatever jax finds (GPU, TPU, or CPU, where it checks the CPU paths: the bookkeeping of
this script, run by the tests). Each row is one path:

  gmm:<backend>        the MoE's SwiGLU experts over a grouped matmul (tokamax, megablox,
                       ragged_dot, blocked) against a loop over experts written here; timed
                       fwd + bwd, with TFLOP/s and the share of a dense SwiGLU of the same FLOPs
                       (`of_dense`; the goal for a grouped matmul is >= 0.8)
  attention:<impl>     causal, segment-masked attention (cudnn, xla, blockwise) against a softmax
                       written here
  dispatch:<mode>      one MoE layer over an expert axis of all devices (ragged_all_to_all,
                       all_gather; >= 2 devices) against the same layer on one device
  bfloat16_step        a train step of a small model in bfloat16 compute against float32

A path passes when every output and gradient is within the tolerance of the oracle's (relative to
the oracle's largest magnitude: 1e-4 in float32, 3e-2 where the path computes in bfloat16).
`--record` adds the passed hardware paths to model/hardware_paths.json for this device kind and jax
version, after which `auto` picks them there (model/hardware_paths.py). Exit status 1 when a path
failed.
"""
import argparse
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.timing import median_seconds

F32_TOL, BF16_TOL = 1e-4, 3e-2


@dataclasses.dataclass(frozen=True)
class Shapes:
  tokens: int      # S
  top_k: int
  experts: int
  d: int
  h: int
  batch: int       # attention
  length: int
  heads: int
  kv_heads: int
  head_dim: int
  step_layers: int  # bfloat16_step: layers of the tiny model


QUICK = Shapes(256, 2, 8, 32, 64, 2, 64, 4, 2, 16, 1)
FULL = Shapes(8192, 8, 64, 1024, 512, 4, 2048, 16, 4, 128, 4)


def _timed(fn, repeats: int = 5) -> float:
  return median_seconds(fn, repeats, sync=jax.block_until_ready)[0]


def _error(got, want) -> float:
  """Largest |got - want| over every leaf, each relative to the oracle leaf's largest magnitude."""
  errs = []
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    if not np.isfinite(g).all():
      return float("inf")
    errs.append(np.abs(g - w).max() / max(np.abs(w).max(), 1e-30))
  return float(max(errs))


def _value_and_grads(f, args, cotangent_seed: int = 7):
  y, vjp = jax.vjp(f, *args)
  ct = jax.random.normal(jax.random.key(cotangent_seed), y.shape, jnp.float32).astype(y.dtype)
  return y, vjp(ct)


def gmm_candidates() -> list[str]:
  from omnimoe.model import grouped_matmul as gmm
  kind = jax.default_backend()
  if kind == "gpu":
    return (["tokamax"] if gmm._tokamax() is not None else []) + ["ragged_dot", "blocked"]
  if kind == "tpu":
    return ["megablox", "ragged_dot", "blocked"]
  return ["blocked", "ragged_dot"]


def check_gmm(backend: str, s: Shapes, dtype) -> dict:
  from omnimoe.model.expert_parallel import swiglu_experts
  r = np.random.default_rng(0)
  S, K, E, D, H = s.tokens, s.top_k, s.experts, s.d, s.h
  expert = jnp.asarray(np.stack([r.permutation(E)[:K] for _ in range(S)]).astype(np.int32))
  weight = jnp.asarray(r.dirichlet(np.ones(K), S).astype(np.float32))
  valid = jnp.ones((S, K), bool)
  x = jnp.asarray(r.standard_normal((S, D)), dtype)
  ws = [jnp.asarray(r.standard_normal(shape) * shape[1] ** -0.5, jnp.float32)
        for shape in ((E, D, H), (E, D, H), (E, H, D))]
  path = lambda x, *w: swiglu_experts(x, expert, valid, weight, *w, backend=backend,
                                      block_rows=256)

  def oracle(x, wg, wu, wd):      # every expert on every token, weighted where chosen
    x = x.astype(jnp.float32)
    y = jnp.zeros((S, D), jnp.float32)
    for e in range(E):
      y_e = (jax.nn.silu(x @ wg[e]) * (x @ wu[e])) @ wd[e]
      y = y + jnp.sum(jnp.where(expert == e, weight, 0.0), axis=1, keepdims=True) * y_e
    return y
  got = jax.jit(lambda *a: _value_and_grads(path, a))(x, *ws)
  want = jax.jit(lambda *a: _value_and_grads(oracle, a))(x.astype(jnp.float32), *ws)
  err = _error(got, want)
  step = jax.jit(jax.grad(lambda x, *w: jnp.sum(path(x, *w).astype(jnp.float32)), (0, 1, 2, 3)))
  seconds = _timed(lambda: step(x, *ws))
  rows = jnp.asarray(r.standard_normal((S * K, D)), dtype)
  dense_w = [w[0].astype(dtype) for w in ws]
  dense = jax.jit(jax.grad(lambda x, wg, wu, wd: jnp.sum(
      ((jax.nn.silu(x @ wg) * (x @ wu)) @ wd).astype(jnp.float32)), (0, 1, 2, 3)))
  dense_s = _timed(lambda: dense(rows, *dense_w))
  flops = 18.0 * S * K * D * H         # three matmuls, forward and two backward each
  return {"max_error": err, "seconds": seconds, "tflops": flops / seconds / 1e12,
          "of_dense": dense_s / seconds}


def naive_attention(q, k, v, seg):
  """Causal, segment-masked softmax attention in float32 (GQA: query head h reads kv head
  h // (H / K))."""
  B, L, H, Dh = q.shape
  k = jnp.repeat(k, H // k.shape[2], axis=2).astype(jnp.float32)
  v = jnp.repeat(v, H // v.shape[2], axis=2).astype(jnp.float32)
  s = jnp.einsum("blhd,bshd->bhls", q.astype(jnp.float32), k) / np.sqrt(Dh)
  see = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
         & (jnp.arange(L)[:, None] >= jnp.arange(L)[None, :]))
  s = jnp.where(see[:, None], s, -jnp.inf)
  p = jnp.nan_to_num(jax.nn.softmax(s, axis=-1))
  o = jnp.einsum("bhls,bshd->blhd", p, v)
  return jnp.where((seg > 0)[:, :, None, None], o, 0.0)


def attention_candidates() -> list[str]:
  return (["cudnn"] if jax.default_backend() == "gpu" else []) + ["xla", "blockwise"]


def check_attention(impl: str, s: Shapes, dtype) -> dict:
  from omnimoe.model.attention import attend
  r = np.random.default_rng(1)
  B, L = s.batch, s.length
  q = jnp.asarray(r.standard_normal((B, L, s.heads, s.head_dim)), dtype)
  k = jnp.asarray(r.standard_normal((B, L, s.kv_heads, s.head_dim)), dtype)
  v = jnp.asarray(r.standard_normal((B, L, s.kv_heads, s.head_dim)), dtype)
  seg = np.ones((B, L), np.int32)
  seg[:, L // 3:] = 2                  # two documents per row, then padding
  seg[:, L - L // 8:] = 0
  seg = jnp.asarray(seg)
  block = min(128, L // 4)
  path = lambda q, k, v: attend(q, k, v, seg, implementation=impl, block=block)
  got = jax.jit(lambda *a: _value_and_grads(path, a))(q, k, v)
  want = jax.jit(lambda *a: _value_and_grads(lambda q, k, v: naive_attention(q, k, v, seg), a))(
      *(a.astype(jnp.float32) for a in (q, k, v)))
  step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(path(q, k, v).astype(jnp.float32)), (0, 1, 2)))
  seconds = _timed(lambda: step(q, k, v))
  flops = 3 * 2 * 2 * B * s.heads * L * L * s.head_dim / 2    # causal half, fwd + 2x bwd
  return {"max_error": _error(got, want), "seconds": seconds, "tflops": flops / seconds / 1e12}


def dispatch_candidates() -> list[str]:
  if jax.device_count() < 2:
    return []
  return ["ragged_all_to_all", "all_gather"]


def check_dispatch(mode: str, s: Shapes, dtype) -> dict:
  from flax import nnx
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  from omnimoe.model.config import MoEConfig
  from omnimoe.model.expert_parallel import Platform
  from omnimoe.model.moe import MoE
  n = jax.device_count()
  E = max(s.experts - s.experts % n, n)
  emulate = jax.default_backend() == "cpu"      # XLA:CPU has no ragged_all_to_all collective
  cfg = MoEConfig(num_experts=E, top_k=s.top_k, expert_hidden=s.h, dispatch=mode)
  B, L = n, max(s.tokens // n, 8)
  x = jax.random.normal(jax.random.key(2), (B, L, s.d), jnp.float32).astype(dtype)
  seg = jnp.ones((B, L), jnp.int32)

  def run(platform, mesh):
    layer_cfg = cfg if mesh is not None else dataclasses.replace(cfg, dispatch="auto")  # local
    graphdef, params = nnx.split(MoE(s.d, layer_cfg, rngs=nnx.Rngs(0), platform=platform))
    f = lambda params, x: nnx.merge(graphdef, params)(x, seg)[0]
    fn = jax.jit(lambda *a: _value_and_grads(f, a))
    if mesh is None:
      return fn(params, x), None
    with jax.set_mesh(mesh):
      xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp", "expert"))))
      out = fn(params, xs)
      return out, lambda: fn(params, xs)
  mesh = jax.make_mesh((1, 1, n, 1, 1), ("data", "fsdp", "expert", "tensor", "context"),
                       axis_types=(AxisType.Auto,) * 5)
  got, again = run(Platform(emulate_ragged=emulate), mesh)
  want, _ = run(Platform(), None)
  with jax.set_mesh(mesh):
    seconds = _timed(again)
  return {"max_error": _error(got, want), "seconds": seconds, "emulated": emulate}


def check_bfloat16_step(s: Shapes, dtype) -> dict:
  from bench import peer
  losses = {}
  for name in ("float32", "bfloat16"):
    cfg = peer.omnimoe_config("tiny", 8 * ((jax.device_count() + 7) // 8), 64)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=name,
                                                             num_layers=s.step_layers))
    out = peer.omnimoe_side(cfg, peer.text_batch(cfg.train.batch_size, 64), 0, 1)
    losses[name] = out["first_ce"]
    seconds = out["median_s"]
  err = abs(losses["bfloat16"] - losses["float32"]) / abs(losses["float32"])
  return {"max_error": err, "seconds": seconds, "losses": losses}


def run_checks(shapes: Shapes) -> list[dict]:
  accel = jax.default_backend() in ("gpu", "tpu")
  dtype = jnp.bfloat16 if accel else jnp.float32
  tol = BF16_TOL if accel else F32_TOL
  plan = ([(f"gmm:{b}", b, lambda b=b: check_gmm(b, shapes, dtype), tol) for b in gmm_candidates()]
          + [(f"attention:{i}", i, lambda i=i: check_attention(
              i, shapes, jnp.bfloat16 if i == "cudnn" else dtype),
              BF16_TOL if i == "cudnn" or accel else F32_TOL) for i in attention_candidates()]
          + [(f"dispatch:{m}", m, lambda m=m: check_dispatch(m, shapes, dtype), tol)
             for m in dispatch_candidates()]
          + [("bfloat16_step", "bfloat16_step", lambda: check_bfloat16_step(shapes, dtype),
              BF16_TOL)])
  from omnimoe.model.hardware_paths import here
  machine = {**here(), "date": time.strftime("%Y-%m-%d", time.gmtime())}
  rows = []
  for name, path, fn, tolerance in plan:
    row = {"check": name, "path": path, **machine, "tolerance": tolerance}
    try:
      row.update(fn())
      row["passed"] = bool(row["max_error"] <= tolerance)
    except Exception as e:     # a path that does not run on this machine fails, with its reason
      row.update(passed=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    rows.append(row)
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", help="write the rows here")
  parser.add_argument("--record", action="store_true",
                      help="add the passed hardware paths to model/hardware_paths.json")
  parser.add_argument("--quick", action="store_true", help="small shapes (the tests; CPU)")
  args = parser.parse_args(argv)
  rows = run_checks(QUICK if args.quick else FULL)
  print(f"{rows[0]['platform']} / {rows[0]['device_kind']} / jax {rows[0]['jax']}")
  print(f"{'check':28s} {'result':6s} {'max error':>10s} {'tol':>7s} {'ms':>9s} {'TFLOP/s':>8s} "
        f"{'of dense':>8s}")
  for r in rows:
    ms = f"{r['seconds'] * 1e3:9.2f}" if "seconds" in r else f"{'-':>9s}"
    tf = f"{r['tflops']:8.3f}" if "tflops" in r else f"{'-':>8s}"
    od = f"{r['of_dense']:8.2f}" if "of_dense" in r else f"{'-':>8s}"
    err = f"{r['max_error']:10.2e}" if "max_error" in r else f"{'-':>10s}"
    print(f"{r['check']:28s} {'pass' if r['passed'] else 'FAIL':6s} {err} {r['tolerance']:7.0e} "
          f"{ms} {tf} {od}" + (f"  {r['error']}" if "error" in r else ""))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  if args.record:
    from omnimoe.model.hardware_paths import add, record_file
    added = add(rows)
    print(f"recorded {len(added)} passed hardware path(s) in {record_file()}: "
          + (", ".join(r["path"] for r in added) or "none"))
  return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())

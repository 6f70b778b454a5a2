"""Blockwise attention, forward + backward, before (every key block for all queries) vs after (query x
key block tiles, causal and segment block skipping), side by side in one process.

    python bench/attention.py --json OUT.json            # 8K and 32K tokens, batch 1, block 128
    python bench/attention.py --lengths 8192 --docs 4    # 4 packed documents per row

`reference` below is the implementation before causal block skipping (model/blockwise_attention.py at
commit fb09a0c), kept here for this comparison only. Times jit(value_and_grad(sum(out * r))) of the
attention alone (tiny-model heads by default: 4 query heads, 2 kv heads, head_dim 32, float32);
median of `--repeats` timed calls after compile, or 1 call where compile + first call took longer
than `--slow` seconds. Prints a table; `--json` writes rows {"tokens", "impl", "ms", "cpu_ms", ...}.
"""
import argparse
import functools
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from omnimoe.model.blockwise_attention import blocks_computed, blockwise_attention

# ---- reference: the blockwise attention before block skipping (scan over key blocks, all queries) ----
_NEG = -1e30


def _ref_blocks(x, nb, block):
  return jnp.moveaxis(x.reshape(x.shape[0], nb, block, *x.shape[2:]), 1, 0)


def _ref_mask(seg_q_BxL, seg_k_Bxb, start, L, block):
  q_pos = jnp.arange(L)[:, None]
  k_pos = start + jnp.arange(block)[None, :]
  same = (seg_q_BxL[:, :, None] == seg_k_Bxb[:, None, :]) & (seg_q_BxL[:, :, None] > 0)
  return (same & (k_pos <= q_pos)[None])[:, None, None]


def _ref_prepare(q, k, v, seg, block):
  B, L, H, D = q.shape
  K = k.shape[2]
  nb = -(-L // block)
  pad = nb * block - L
  k_p = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
  v_p = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
  seg_k = jnp.pad(seg, ((0, 0), (0, pad)))
  q_BxKxGxLxD = q.reshape(B, L, K, H // K, D).transpose(0, 2, 3, 1, 4)
  xs = (_ref_blocks(k_p, nb, block), _ref_blocks(v_p, nb, block), _ref_blocks(seg_k, nb, block),
        jnp.arange(nb) * block)
  return q_BxKxGxLxD, xs


def _ref_forward(q, k, v, seg, block):
  B, L, H, D = q.shape
  scale = D ** -0.5
  q5, xs = _ref_prepare(q, k, v, seg, block)
  K, G = q5.shape[1], q5.shape[2]

  def body(carry, x):
    m, l, acc = carry
    k_b, v_b, seg_b, start = x
    s = jnp.einsum("bkgld,bskd->bkgls", q5, k_b, preferred_element_type=jnp.float32) * scale
    mask = _ref_mask(seg, seg_b, start, L, block)
    s = jnp.where(mask, s, _NEG)
    m_new = jnp.maximum(m, s.max(axis=-1))
    corr = jnp.exp(m - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    l = l * corr + p.sum(axis=-1)
    pv = jnp.einsum("bkgls,bskd->bkgld", p.astype(v_b.dtype), v_b,
                    preferred_element_type=jnp.float32)
    return (m_new, l, acc * corr[..., None] + pv), None

  init = (jnp.full((B, K, G, L), _NEG, jnp.float32), jnp.zeros((B, K, G, L), jnp.float32),
          jnp.zeros((B, K, G, L, D), jnp.float32))
  (m, l, acc), _ = jax.lax.scan(body, init, xs)
  has_keys = l > 0
  out5 = acc / jnp.where(has_keys, l, 1.0)[..., None]
  lse = jnp.where(has_keys, m + jnp.log(jnp.where(has_keys, l, 1.0)), 0.0)
  out = out5.transpose(0, 3, 1, 2, 4).reshape(B, L, H, D).astype(q.dtype)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def reference(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL, block: int):
  """The blockwise attention before block skipping (benchmark baseline only)."""
  return _ref_forward(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL, block)[0]


def _ref_fwd(q, k, v, seg, block):
  out, lse = _ref_forward(q, k, v, seg, block)
  return out, (q, k, v, seg, out, lse)


def _ref_bwd(block, res, dout):
  q, k, v, seg, out, lse = res
  B, L, H, D = q.shape
  K = k.shape[2]
  G = H // K
  scale = D ** -0.5
  q5, xs = _ref_prepare(q, k, v, seg, block)
  do5 = dout.reshape(B, L, K, G, D).transpose(0, 2, 3, 1, 4)
  o5 = out.reshape(B, L, K, G, D).transpose(0, 2, 3, 1, 4)
  delta = jnp.sum(do5.astype(jnp.float32) * o5.astype(jnp.float32), axis=-1)

  def body(dq, x):
    k_b, v_b, seg_b, start = x
    s = jnp.einsum("bkgld,bskd->bkgls", q5, k_b, preferred_element_type=jnp.float32) * scale
    mask = _ref_mask(seg, seg_b, start, L, block)
    p = jnp.where(mask, jnp.exp(jnp.where(mask, s, _NEG) - lse[..., None]), 0.0)
    dv_b = jnp.einsum("bkgls,bkgld->bskd", p.astype(do5.dtype), do5,
                      preferred_element_type=jnp.float32)
    dp = jnp.einsum("bkgld,bskd->bkgls", do5, v_b, preferred_element_type=jnp.float32)
    ds = (p * (dp - delta[..., None]) * scale).astype(q5.dtype)
    dq = dq + jnp.einsum("bkgls,bskd->bkgld", ds, k_b, preferred_element_type=jnp.float32)
    dk_b = jnp.einsum("bkgls,bkgld->bskd", ds, q5, preferred_element_type=jnp.float32)
    return dq, (dk_b, dv_b)

  dq5, (dk_n, dv_n) = jax.lax.scan(body, jnp.zeros(q5.shape, jnp.float32), xs)

  def unblock(x_n):
    return jnp.moveaxis(x_n, 0, 1).reshape(B, -1, K, D)[:, :L]

  dq = dq5.transpose(0, 3, 1, 2, 4).reshape(B, L, H, D).astype(q.dtype)
  return dq, unblock(dk_n).astype(k.dtype), unblock(dv_n).astype(v.dtype), None


reference.defvjp(_ref_fwd, _ref_bwd)
# ---- end of reference ----

IMPLS = {"before": reference, "after": blockwise_attention}


def _inputs(L, heads, kv_heads, head_dim, docs):
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (1, L, heads, head_dim))
  k = jax.random.normal(keys[1], (1, L, kv_heads, head_dim))
  v = jax.random.normal(keys[2], (1, L, kv_heads, head_dim))
  r = jax.random.normal(keys[3], (1, L, heads, head_dim))
  seg = jnp.asarray(1 + np.arange(L) * docs // L, jnp.int32)[None]  # `docs` equal documents
  return q, k, v, seg, r


def time_impl(fn, args, block, repeats, slow):
  """(loss, compile+first s, wall times, process-CPU times) of jit(value_and_grad) of fn."""
  q, k, v, seg, r = args
  step = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v, seg, block) * r), (0, 1, 2)))
  t0 = time.perf_counter()
  loss, _ = jax.block_until_ready(step(q, k, v))
  first = time.perf_counter() - t0
  walls, cpus = [], []
  for _ in range(1 if first > slow else repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(step(q, k, v))
    walls.append(time.perf_counter() - t0)
    cpus.append(time.process_time() - c0)
  return float(loss), first, walls, cpus


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
  p.add_argument("--block", type=int, default=128)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv-heads", type=int, default=2)
  p.add_argument("--head-dim", type=int, default=32)
  p.add_argument("--docs", type=int, default=1, help="equal packed documents per row")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--slow", type=float, default=30.0, help="time 1 call past this compile+first s")
  p.add_argument("--json", type=pathlib.Path, help="write the rows here")
  args = p.parse_args(argv)
  rows = []
  print("| tokens | before ms | after ms | speedup | pairs computed / all | loss before, after |")
  print("|---:|---:|---:|---:|---:|---|")
  for L in args.lengths:
    inputs = _inputs(L, args.heads, args.kv_heads, args.head_dim, args.docs)
    counts = jax.jit(blocks_computed, static_argnums=4)(*inputs[:4], args.block)[0]
    nb = -(-L // args.block)
    res = {}
    for name, fn in IMPLS.items():
      loss, first, walls, cpus = time_impl(fn, inputs, args.block, args.repeats, args.slow)
      res[name] = statistics.median(walls) * 1e3
      rows.append({"tokens": L, "impl": name, "ms": res[name],
                   "cpu_ms": statistics.median(cpus) * 1e3, "runs": len(walls),
                   "compile_and_first_s": first, "loss": loss, "block": args.block,
                   "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                   "docs": args.docs, "pairs_computed": int(counts[1]), "pairs_all": nb * nb})
    losses = ", ".join(f"{r['loss']:.4f}" for r in rows[-2:])
    print(f"| {L} | {res['before']:.0f} | {res['after']:.0f} | {res['before'] / res['after']:.2f}x"
          f" | {int(counts[1])} / {nb * nb} | {losses} |", flush=True)
  if args.json:
    args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
  main()

"""omnimoe's train step against Hugging Face transformers' Qwen3-MoE at the same shape, one after the
other in one process, on this machine's CPU.

    python -m bench.peer --json OUT.json [--shapes tiny,d256] [--steps 10] [--warmup 3]

Both sides train the same model function (omnimoe's decoder is a Qwen3-MoE on text: RMSNorm,
QK-norm, RoPE, GQA, SwiGLU experts with renormalised top-k, untied head), float32, on the same
batch of B x L text tokens (every token real: one document per row, no padding, so both count B x L
tokens), with AdamW (the same learning rate, betas, weight decay), global-norm clipping at the same
value and the Switch load-balancing loss at the same coefficient. omnimoe runs its trainer's own
step (train/step.py, the optimizer update included, the MoE backend `auto` picks); the peer runs
`loss.backward()`, `clip_grad_norm_`, `AdamW.step()` with its default attention (SDPA) and its
default experts implementation. omnimoe's step also adds its router z-loss (1e-3; the peer has
none). A step is timed from its start until its updated parameters exist (jax:
`block_until_ready`; torch is synchronous on CPU); the figure is the median of every timed step
(`--steps` after `--warmup`, in each of `--repeats` processes per side, the sides' processes
interleaved). Each side runs in a process of its own, so neither framework's thread pool spins
beside the other's. Threads: torch uses `torch.get_num_threads()` (set to the machine's cores),
XLA:CPU its own pool over the same cores. The peer is timed with each experts implementation in
`--peer-experts` (`grouped_mm`, its default, and `eager`, its loop over experts); the ratio is
against the faster.

The machine's float32 matmul ceiling is measured for both frameworks in the same run (a square
matmul, best of 5), and each side's step is reported as model FLOP/s (6 x active matmul parameters
+ causal attention per token, `omnimoe plan`'s count, the same for both) over its framework's
ceiling.
"""
import argparse
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from bench.timing import median_seconds, seconds

SHAPES = {   # name -> config overrides on the tiny default (d 128, 4 layers, 8 experts top-2, 256)
    "tiny": [],
    "d256": ["model.d_model=256", "model.num_heads=8", "model.num_kv_heads=4",
             "model.moe.expert_hidden=512"],
    # configs/rack_nvl72.yaml's model: 0.9B parameters, 0.16B active (bench/gpu.py)
    "nvl72": ["model.num_layers=8", "model.d_model=1024", "model.num_heads=16",
              "model.num_kv_heads=4", "model.head_dim=64", "model.rope_sections=[16,8,8]",
              "model.moe.num_experts=64", "model.moe.top_k=8", "model.moe.expert_hidden=512"],
}
VOCAB = 512          # the default dataset's vocabulary
FEATURES = 24        # the batch's feature width (unused by text-only rows)


def text_batch(batch: int, seq: int, seed: int = 0) -> dict:
  """B x L text tokens, one document per row, no padding (the batch contract, docs/design.md)."""
  r = np.random.default_rng(seed)
  tokens = r.integers(4, VOCAB, (batch, seq + 1)).astype(np.int32)
  pos = np.broadcast_to(np.arange(seq, dtype=np.int32)[None, :, None], (batch, seq, 3))
  weights = np.ones((batch, seq), np.float32)
  weights[:, -1] = 0.0     # the loss covers positions 0..L-2, as the peer's shifted labels do
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
          "features": np.zeros((batch, seq, FEATURES), np.float32),
          "modality": np.ones((batch, seq), np.int8), "segment_ids": np.ones((batch, seq), np.int32),
          "positions": np.ascontiguousarray(pos), "loss_weights": weights}


def omnimoe_config(shape: str, batch: int, seq: int, dtype: str = "float32", extra=()):
  from omnimoe.train import config as config_lib
  # No moving average of the weights (train.ema_decay): the peer's step keeps none.
  return config_lib.load(None, [*SHAPES[shape], f"train.batch_size={batch}", f"data.seq_len={seq}",
                                f"model.dtype={dtype}", "train.ema_decay=0", *extra])


def omnimoe_side(cfg, host_batch: dict, warmup: int, steps: int) -> dict:
  from omnimoe.train.mesh import batch_sharding, global_batch, make_mesh
  from omnimoe.train.plan import model_flops_per_token
  from omnimoe.train.state import init_state, make_setup
  from omnimoe.train.step import make_train_step
  mesh = make_mesh(cfg.mesh)
  info = types.SimpleNamespace(vocab=types.SimpleNamespace(size=VOCAB), feature_dim=FEATURES)
  setup = make_setup(cfg, mesh, info)
  state = init_state(cfg, setup)
  step_fn = make_train_step(cfg, setup, batch_sharding(mesh, cfg.data.seq_len))
  batch = global_batch(host_batch, mesh)
  holder = {"state": state}

  def step():
    holder["state"], holder["metrics"] = step_fn(holder["state"], batch)
    jax.block_until_ready(holder["state"]["params"])
  t0 = time.perf_counter()
  step()
  compile_s = time.perf_counter() - t0
  first_ce = float(holder["metrics"]["ce_loss"])
  med, times = median_seconds(step, steps, warmup)
  stats = jax.devices()[0].memory_stats() or {}
  return {"median_s": med, "times_s": times, "compile_s": compile_s, "first_ce": first_ce,
          "peak_bytes": stats.get("peak_bytes_in_use"),
          "flops_per_token": model_flops_per_token(cfg, setup.abstract_state["params"])}


def write_initial_weights(cfg, hf_keys: dict, folder: pathlib.Path) -> None:
  """omnimoe's initial parameters (train.seed) as a Hugging Face folder (config.json +
  model.safetensors, train/hf_names.py's maps), so both sides start from the same weights."""
  from safetensors.numpy import save_file
  from omnimoe.train import hf_names
  from omnimoe.train.state import init_state, make_setup
  from omnimoe.train.mesh import make_mesh
  info = types.SimpleNamespace(vocab=types.SimpleNamespace(size=VOCAB), feature_dim=FEATURES)
  setup = make_setup(cfg, make_mesh(cfg.mesh), info)
  params = jax.device_get(init_state(cfg, setup, optimizer=False)["params"])
  tensors = {}
  for w in hf_names.weights(cfg.model, VOCAB):
    for name, t in zip(w.names, w.to_hf(np.asarray(hf_names.get(params, w.path)))):
      tensors[name] = np.ascontiguousarray(t, np.float32)
  save_file(tensors, str(folder / "model.safetensors"))
  (folder / "config.json").write_text(json.dumps(
      {**hf_keys, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"}))


def peer_side(cfg, host_batch: dict, warmup: int, steps: int, experts: str) -> dict:
  import torch
  import transformers
  from omnimoe.train.hf_config import hf_config
  keys = {k: v for k, v in hf_config(cfg.model, VOCAB, "float32").items()
          if k not in ("architectures", "model_type", "torch_dtype", "rope_theta", "rope_scaling")}
  keys["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.model.rope_theta}
  hf_cfg = transformers.Qwen3MoeConfig(**keys, output_router_logits=True,
                                       router_aux_loss_coef=cfg.model.moe.load_balance_coef,
                                       max_position_embeddings=cfg.data.seq_len)
  hf_cfg._experts_implementation = experts
  with tempfile.TemporaryDirectory() as folder:      # omnimoe's initial weights, as HF tensors
    write_initial_weights(cfg, keys, pathlib.Path(folder))
    model = transformers.Qwen3MoeForCausalLM.from_pretrained(folder, config=hf_cfg)
  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  model = model.float().to(device).train()      # float32 masters, as omnimoe keeps them
  bf16 = cfg.model.dtype == "bfloat16"          # then compute in bfloat16 under autocast
  t = cfg.train
  decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
  keep = [p for n, p in model.named_parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                           {"params": keep, "weight_decay": 0.0}],
                          lr=t.learning_rate, betas=(t.b1, t.b2), eps=1e-8)
  ids = torch.from_numpy(np.concatenate([host_batch["tokens"], host_batch["targets"][:, -1:]], 1)).long()
  inputs = ids[:, :-1].contiguous().to(device)
  labels = inputs
  holder = {}

  def step():
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
      out = model(input_ids=inputs, labels=labels)
    out.loss.backward()
    holder.setdefault("first_ce", float(out.loss - hf_cfg.router_aux_loss_coef * out.aux_loss))
    if t.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if cuda:
      torch.cuda.synchronize()
  t0 = time.perf_counter()
  step()
  first_s = time.perf_counter() - t0
  med, times = median_seconds(step, steps, warmup)
  return {"median_s": med, "times_s": times, "first_step_s": first_s,
          "first_ce": holder["first_ce"],
          "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
          "attention": getattr(hf_cfg, "_attn_implementation", None),
          "experts": getattr(hf_cfg, "_experts_implementation", None)}


def jax_ceiling(n: int = 1024, repeats: int = 5, dtype: str = "float32") -> float:
  """GFLOP/s of an n x n x n matmul in jax (best of `repeats`)."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  return 2.0 * n ** 3 / min(seconds(lambda: f(a).block_until_ready()) for _ in range(repeats)) / 1e9


def torch_ceiling(n: int = 1024, repeats: int = 5, dtype: str = "float32") -> float:
  import torch
  b = torch.from_numpy(np.random.default_rng(0).normal(size=(n, n)).astype(np.float32))
  if torch.cuda.is_available():
    b = b.cuda()
  b = b.to(getattr(torch, dtype))
  sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
  mm = lambda: (torch.mm(b, b), sync())
  mm()
  return 2.0 * n ** 3 / min(seconds(mm) for _ in range(repeats)) / 1e9


def worker(side: str, shape: str, args) -> dict:
  """One side at one shape, in a process of its own (neither framework's thread pool is left
  spinning beside the other's): its step times and its framework's matmul ceiling."""
  cfg = omnimoe_config(shape, args.batch, args.seq, args.dtype, args.extra)
  host = text_batch(args.batch, args.seq)
  n = 1024 if jax.default_backend() == "cpu" else 8192
  if side == "omnimoe":
    out = omnimoe_side(cfg, host, args.warmup, args.steps)
    out["ceiling_gflops"] = jax_ceiling(n, dtype=args.dtype)
    return out
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  out = {impl: peer_side(cfg, host, args.warmup, args.steps, impl)
         for impl in args.peer_experts.split(",")}
  return {"variants": out, "ceiling_gflops": torch_ceiling(n, dtype=args.dtype),
          "threads": torch.get_num_threads()}


def _run_worker(side: str, shape: str, args) -> dict:
  cmd = [sys.executable, "-m", "bench.peer", "--worker", side, "--shapes", shape,
         "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
         "--warmup", str(args.warmup), "--peer-experts", args.peer_experts,
         "--dtype", args.dtype, *[f"--extra={e}" for e in args.extra]]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                        cwd=pathlib.Path(__file__).resolve().parent.parent)
  if done.returncode != 0:
    raise RuntimeError(f"{side} at {shape} failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", help="write the results here")
  parser.add_argument("--shapes", default="tiny,d256")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=2,
                      help="processes per side and shape, interleaved; medians over them")
  parser.add_argument("--peer-experts", default="grouped_mm,eager",
                      help="transformers' experts implementations to time (grouped_mm is its "
                           "default); the ratio is against the fastest")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="compute dtype of both sides (masters stay float32 on both)")
  parser.add_argument("--extra", action="append", default=[],
                      help="a config override of the shape (e.g. model.remat=full, which the peer ignores)")
  parser.add_argument("--worker", choices=["omnimoe", "peer"], help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(args.worker, args.shapes, args)))
    return {}
  import torch
  import transformers
  tokens = args.batch * args.seq
  rows = []
  for shape in args.shapes.split(","):
    ours, peers = [], []
    for _ in range(args.repeats):          # interleaved: omnimoe, peer, omnimoe, peer, ...
      ours.append(_run_worker("omnimoe", shape, args))
      peers.append(_run_worker("peer", shape, args))
    cfg = omnimoe_config(shape, args.batch, args.seq, args.dtype, args.extra)
    med = lambda xs: statistics.median(xs)
    ours_s = med([t for o in ours for t in o["times_s"]])
    by_impl = {impl: med([t for p in peers for t in p["variants"][impl]["times_s"]])
               for impl in peers[0]["variants"]}
    fastest = min(by_impl, key=by_impl.get)
    flops = ours[0]["flops_per_token"] * tokens
    jax_ceil = med([o["ceiling_gflops"] for o in ours])
    torch_ceil = med([p["ceiling_gflops"] for p in peers])
    row = {"shape": shape, "d_model": cfg.model.d_model, "tokens_per_step": tokens,
           "omnimoe_step_s": ours_s, "peer_step_s": by_impl, "peer_experts": fastest,
           "omnimoe_tokens_per_s": tokens / ours_s,
           "peer_tokens_per_s": tokens / by_impl[fastest],
           "omnimoe_of_ceiling": flops / ours_s / 1e9 / jax_ceil,
           "peer_of_ceiling": flops / by_impl[fastest] / 1e9 / torch_ceil,
           "jax_ceiling_gflops": jax_ceil, "torch_ceiling_gflops": torch_ceil,
           "flops_per_token": ours[0]["flops_per_token"], "runs": {"omnimoe": ours, "peer": peers}}
    row["ratio"] = row["omnimoe_tokens_per_s"] / row["peer_tokens_per_s"]
    from omnimoe.train.mfu import datasheet_peak_tflops
    peak = datasheet_peak_tflops(jax.devices()[0].device_kind) if jax.default_backend() != "cpu" else None
    if peak:
      row["omnimoe_mfu"] = flops / ours_s / (peak * 1e12)
      row["peer_mfu"] = flops / by_impl[fastest] / (peak * 1e12)
    row["peak_bytes"] = {"omnimoe": ours[0].get("peak_bytes"),
                         "peer": peers[0]["variants"][fastest].get("peak_bytes")}
    row["first_ce"] = {"omnimoe": ours[0]["first_ce"],
                       "peer": peers[0]["variants"][fastest]["first_ce"]}
    rows.append(row)
  result = {"machine": {"platform": platform.platform(), "cores": os.cpu_count(),
                        "jax": jax.__version__, "torch": torch.__version__,
                        "transformers": transformers.__version__,
                        "torch_threads": peers[0]["threads"],
                        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime())},
            "batch": args.batch, "seq": args.seq, "dtype": args.dtype, "extra": args.extra,
            "steps": args.steps, "warmup": args.warmup,
            "repeats": args.repeats, "rows": rows}
  print(f"{'shape':6s} {'omnimoe tok/s':>14s} {'peer tok/s':>11s} {'ratio':>6s} "
        f"{'omnimoe ms':>11s} {'peer ms':>8s} {'omni/ceil':>9s} {'peer/ceil':>9s}  peer experts")
  for r in rows:
    others = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in r["peer_step_s"].items())
    print(f"{r['shape']:6s} {r['omnimoe_tokens_per_s']:14.0f} {r['peer_tokens_per_s']:11.0f} "
          f"{r['ratio']:5.2f}x {r['omnimoe_step_s'] * 1e3:11.0f} "
          f"{r['peer_step_s'][r['peer_experts']] * 1e3:8.0f} {r['omnimoe_of_ceiling']:9.1%} "
          f"{r['peer_of_ceiling']:9.1%}  fastest {r['peer_experts']} ({others})")
  for r in rows:
    if "omnimoe_mfu" in r:
      gib = lambda b: f"{b / 2**30:.1f} GiB" if b else "-"
      print(f"{r['shape']}: MFU omnimoe {r['omnimoe_mfu']:.1%}, peer {r['peer_mfu']:.1%}; peak "
            f"memory omnimoe {gib(r['peak_bytes']['omnimoe'])}, peer {gib(r['peak_bytes']['peer'])}")
  print("the same function: first step's cross entropy, omnimoe / peer: " + ", ".join(
      f"{r['shape']} {r['first_ce']['omnimoe']:.6f} / {r['first_ce']['peer']:.6f}" for r in rows))
  print(f"{args.dtype} matmul ceilings (GFLOP/s): " + ", ".join(
      f"{r['shape']}: jax {r['jax_ceiling_gflops']:.0f}, torch {r['torch_ceiling_gflops']:.0f}"
      for r in rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()

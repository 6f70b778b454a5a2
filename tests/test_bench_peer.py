"""bench/peer.py compares like with like: both sides start from the same weights and compute the
same function, so the first step's cross entropy agrees (float32); its table's ratio is the
sides' measured step times."""
import types

import numpy as np

from bench import peer


def test_both_sides_compute_the_same_first_loss_and_the_ratio_is_the_step_times():
  args = types.SimpleNamespace(batch=8, seq=32, steps=1, warmup=0,
                               peer_experts="grouped_mm,eager", dtype="float32", extra=[])
  cfg = peer.omnimoe_config("tiny", args.batch, args.seq)
  host = peer.text_batch(args.batch, args.seq)
  assert (host["targets"][:, :-1] == host["tokens"][:, 1:]).all()   # next-token targets
  ours = peer.omnimoe_side(cfg, host, args.warmup, args.steps)
  theirs = peer.worker("peer", "tiny", args)
  assert len(ours["times_s"]) == 1 and ours["median_s"] > 0
  # The same weights (omnimoe's initial ones through a safetensors folder), the same tokens: the
  # cross entropy of step 1 matches to float32 rounding, under both experts implementations.
  for impl in ("grouped_mm", "eager"):
    np.testing.assert_allclose(theirs["variants"][impl]["first_ce"], ours["first_ce"], rtol=2e-6)
  # Random weights on a 512-token vocabulary: near ln(512), not a constant.
  assert abs(ours["first_ce"] - np.log(512)) < 0.5
  # The model FLOPs per token the table divides by: 6 x active matmul parameters + attention,
  # counted here by hand for the tiny shape (d 128, 4 layers, heads 4 x 32, kv 2 x 32, 8
  # experts top-2 of width 256, vocabulary 512, L = 32).
  d, h = 128, 32
  attention = d * 4 * h + 2 * d * 2 * h + 4 * h * d
  experts = 2 * 3 * d * 256
  router = d * 8
  head = d * 512
  active = 4 * (attention + experts + router) + head
  assert ours["flops_per_token"] == 6 * active + 6 * 4 * 4 * h * 32


def test_the_gpu_benchmark_runs_the_nvl72_plans_model_and_refuses_a_cpu(capsys):
  """bench/gpu.py's shape is configs/rack_nvl72.yaml's model exactly (0.83B parameters, 0.12B
  active per token, counted by hand below); without a GPU it says so and exits 2."""
  import dataclasses
  import math
  import jax
  from bench import gpu
  from omnimoe.train import config as config_lib
  from omnimoe.train.state import make_setup
  from omnimoe.train.mesh import make_mesh
  plan = config_lib.load("configs/rack_nvl72.yaml", [])
  ours = peer.omnimoe_config("nvl72", 8, 4096, "bfloat16")
  assert ours.model == dataclasses.replace(plan.model)
  info = types.SimpleNamespace(vocab=types.SimpleNamespace(size=peer.VOCAB),
                               feature_dim=peer.FEATURES)
  params = make_setup(ours, make_mesh(ours.mesh), info).abstract_state["params"]
  total = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
  experts = sum(math.prod(p.shape) for path, p in jax.tree_util.tree_flatten_with_path(params)[0]
                if "w_" in str(path[-1]) and "moe" in str(path))
  # By hand: per layer q, k, v, o (1024 x 16*64, 2 x 1024 x 4*64, 16*64 x 1024), QK-norm (2 x 64),
  # two norms, router (1024 x 64) and 64 experts x 3 x 1024 x 512; then the 512-row table and
  # head, the three media embedders (24 x 1024 and a bias each) and the final norm.
  layer = 2 * 1024 * 1024 + 2 * 1024 * 256 + 2 * 64 + 2 * 1024 + 1024 * 64 + 64 * 3 * 1024 * 512
  assert total == 8 * layer + 2 * 512 * 1024 + 3 * (24 + 1) * 1024 + 1024 == 827_945_984
  assert experts == 8 * 64 * 3 * 1024 * 512
  assert total - experts * 7 // 8 == 123_302_912          # active: 8 of 64 experts
  assert gpu.main([]) == 2
  assert "bench/gpu.py needs a GPU; jax sees cpu" in capsys.readouterr().err

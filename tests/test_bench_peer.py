"""bench/peer.py compares like with like: both sides start from the same weights and compute the
same function, so the first step's cross entropy agrees (float32); its table's ratio is the
sides' measured step times."""
import types

import numpy as np

from bench import peer


def test_both_sides_compute_the_same_first_loss_and_the_ratio_is_the_step_times():
  args = types.SimpleNamespace(batch=8, seq=32, steps=2, warmup=1,
                               peer_experts="grouped_mm,eager")
  cfg = peer.omnimoe_config("tiny", args.batch, args.seq)
  host = peer.text_batch(args.batch, args.seq)
  assert (host["targets"][:, :-1] == host["tokens"][:, 1:]).all()   # next-token targets
  ours = peer.omnimoe_side(cfg, host, args.warmup, args.steps)
  theirs = peer.worker("peer", "tiny", args)
  assert len(ours["times_s"]) == 2 and ours["median_s"] > 0
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

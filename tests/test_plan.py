"""`omnimoe plan`: figures read back from an ahead-of-time compile."""
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from omnimoe.train import config as config_lib
from omnimoe.train.mesh import make_mesh
from omnimoe.train.plan import collective_bytes, model_flops_per_token, plan

ROOT = pathlib.Path(__file__).parent.parent


def test_collective_bytes_counts_an_all_reduce():
  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  x = jax.ShapeDtypeStruct((8, 256), jnp.float32, sharding=NamedSharding(mesh, P("d")))
  compiled = jax.jit(lambda x: x.sum(0), out_shardings=NamedSharding(mesh, P())).lower(x).compile()
  got = collective_bytes(compiled.as_text())
  assert got["all-reduce"] == 256 * 4, got      # one f32[256] partial sum per device
  assert got["all-to-all"] == 0


# The default model with one layer, by hand: width 128, 4 query and 2 key/value heads of 32 (with
# QK-norm), 8 experts of hidden 256 (top 2); the default dataset's vocabulary 512 and feature
# width 24 (image, audio and video projections); sequence 128.
D, HEADS, KV, DH, E, K, H, V, F, L = 128, 4, 2, 32, 8, 2, 256, 512, 24, 128
ATTENTION = D * HEADS * DH * 2 + D * KV * DH * 2            # q, o; k, v
EXPERTS = 3 * E * D * H                                     # gate, up, down of every expert
PARAMETERS = (V * D + 3 * F * D + 3 * D                     # table; media projections, biases
              + ATTENTION + 2 * DH + 3 * D                  # qk-norm; attention, expert, final norms
              + D * E + EXPERTS + D * V)                    # router, experts, head


def test_plan_of_an_expert_parallel_mesh():
  cfg = config_lib.load(None, ["mesh.within_rack.data=2", "mesh.within_rack.expert=4",
                               "model.num_layers=1"])
  p = plan(cfg)
  assert p["mesh"]["expert"] == 4 and p["devices"] == 8
  assert p["parameters"] == PARAMETERS
  # Expert weights are split 4 ways over `expert`, everything else replicated (fsdp = tensor = 1).
  assert p["param_bytes_per_device"] == 4 * (PARAMETERS - EXPERTS + EXPERTS // 4)
  # AdamW's mu and nu are laid out like the parameters, plus two int32 step counters (Adam's and
  # the learning-rate schedule's).
  assert p["optimizer_bytes_per_device"] == 2 * p["param_bytes_per_device"] + 2 * 4
  # The weight average (train.ema_decay, on by default) is laid out like the parameters.
  assert p["ema_bytes_per_device"] == p["param_bytes_per_device"]
  # The model's count: 6 x the matmul parameters a token uses (2 of the 8 experts) + attention.
  active = ATTENTION + D * E + 3 * D * H * K + D * V
  assert p["model_flops_per_token"] == 6 * active + 6 * HEADS * DH * L
  # XLA's count of the compiled step (every device's, per token). Outside the experts every matmul
  # runs outside loops, so XLA counts it whole: forward, and twice that backward (input and weight
  # gradients), except the media projections of the inputs (weight gradients only); attention
  # scores and values over all L keys (the xla backend at L = 128). The experts' blocked grouped
  # matmul is a loop that XLA counts one tile of, so their share counts less than the 2 experts a
  # token uses. Measured: 1.38 MFLOP between 0.92 and 2.10.
  forward = 2 * (2 * F * D + ATTENTION + 2 * L * HEADS * DH + D * E + D * V)
  outside_experts = 3 * forward - 2 * (2 * F * D)
  every_chosen_expert = 3 * 2 * 3 * D * H * K
  assert outside_experts < p["flops_per_token"] < outside_experts + every_chosen_expert
  assert p["activation_bytes_per_device"] > 0


def test_model_flops_by_hand():
  cfg = config_lib.load(None, ["model.num_layers=1"])
  from omnimoe.train.state import _new_model
  from flax import nnx
  params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: _new_model(cfg, V, F, 0))))
  active = ATTENTION + D * E + 3 * D * H * K + D * V        # + router, 2 of 8 experts, head
  assert model_flops_per_token(cfg, params) == 6 * active + 6 * 1 * HEADS * DH * L


def test_plan_command_simulates_the_devices_the_mesh_needs():
  out = subprocess.run([sys.executable, "-m", "omnimoe.train.cli", "plan", "model.num_layers=1",
                        "mesh.within_rack.data=2", "mesh.within_rack.expert=2"],
                       cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "mesh: data 2 x expert 2 (4 devices)" in out.stdout
  assert "FLOPs per token" in out.stdout and "all-reduce" in out.stdout


def test_plan_for_a_gpu_chooses_ragged_all_to_all_and_estimates_its_bytes():
  """--platform gpu: auto is ragged_all_to_all on an expert axis, compiled with the collective
  emulated; the expected bytes are the emulated (worst-case) all-to-all x r / G, here 2 of 8
  experts over 4 expert devices: r = 4 x (1 - C(6, 2) / C(8, 2)) = 52 / 28. A plan for the CPU
  made after it is the CPU's: nothing of the GPU's choices is left behind."""
  cfg = config_lib.load(None, ["mesh.within_rack.data=2", "mesh.within_rack.expert=4",
                               "model.num_layers=1"])
  on_gpu, on_cpu = plan(cfg, "gpu"), plan(cfg)
  assert on_cpu["dispatch"] == "all_gather" and "ragged_all_to_all_expected_bytes" not in on_cpu
  assert on_cpu["platform"] == "cpu"
  assert on_cpu["collective_bytes_per_device_per_step"]["all-to-all"] == 0   # no exchange compiled
  assert on_gpu["dispatch"] == "ragged_all_to_all" and on_gpu["platform"] == "gpu"
  a2a = on_gpu["collective_bytes_per_device_per_step"]["all-to-all"]
  assert a2a > 0 and on_gpu["ragged_all_to_all_expected_bytes"] == int(a2a * (52 / 28) / 4)


def test_length_table_ring_gathers_no_whole_row():
  """all_gather gathers whole rows of K/V; ring moves them only by collective-permute."""
  from omnimoe.train.plan import describe_lengths, length_table
  cfg = config_lib.load(None, ["model.num_layers=1", "model.d_model=32", "model.num_heads=2",
                               "model.num_kv_heads=1", "model.head_dim=16",
                               "model.rope_sections=[4,2,2]", "model.moe.num_experts=4",
                               "model.moe.expert_hidden=32", "train.batch_size=1",
                               "model.attention=blockwise", "model.attention_block=16",
                               "mesh.within_rack.data=1", "mesh.within_rack.context=8"])
  rows = length_table(cfg, [256])
  assert [(r["seq_len"], r["context_parallel"]) for r in rows] == [(256, "all_gather"), (256, "ring")]
  for r in rows:
    ring = r["context_parallel"] == "ring"
    assert (r["whole_row_gathers"] == 0) == ring
    assert (r["collective_permute_bytes"] > 0) == ring
    assert r["total_bytes_per_device"] > r["activation_bytes_per_device"] > 0
  assert "| 256 | ring |" in describe_lengths(rows)


@pytest.mark.slow   # one compile of a 1M-token step on 64 simulated devices: about 40-60 s
def test_long_1m_plan_fits_80_gib_per_device_with_a_ring():
  out = subprocess.run([sys.executable, "-m", "omnimoe.train.cli", "plan", "long_1m",
                        "--platform", "gpu"], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "mesh: expert 4 x context 16 (64 devices)" in out.stdout
  assert "tokens per step:           4194304" in out.stdout
  total = [line for line in out.stdout.splitlines() if line.startswith("total per device:")][0]
  value, unit = total.split()[3:5]
  assert unit == "GiB" and float(value) < 80, total
  assert "ring: no all-gather of a whole row; K/V move by collective-permute" in out.stdout

"""Expert-parallel dispatch (model/expert_parallel.py) against the one-device oracle, and
rack-limited routing (model/router.py group_limit)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from omnimoe.model import expert_parallel
from omnimoe.model.config import MoEConfig
from omnimoe.model.expert_parallel import Platform
from omnimoe.model.moe import MoE
from omnimoe.model.router import group_limit, top_k_routing
from omnimoe.model.sharding import fit_spec

AXES = ("data", "fsdp", "expert", "tensor", "context")
B, L, D = 8, 16, 32
MESHES = {"data2_expert4": (2, 1, 4, 1, 1), "fsdp2_expert2_tensor2": (1, 2, 2, 2, 1),
          "expert8": (1, 1, 8, 1, 1), "data8": (8, 1, 1, 1, 1)}


def _inputs(b=B, l=L):
  x = jax.random.normal(jax.random.key(1), (b, l, D))
  seg = jnp.ones((b, l), jnp.int32).at[:, l - 4:].set(0)    # 4 padding positions per row
  return x, seg


def _run(cfg, mesh_shape, b=B, l=L, platform=Platform()):
  """(loss, y, dropped_fraction, grads of params and x) of one MoE layer; loss on valid positions."""
  x, seg = _inputs(b, l)
  graphdef, params = nnx.split(MoE(D, cfg, rngs=nnx.Rngs(0), platform=platform))

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params)(x, seg)
    return jnp.sum(jnp.sin(y) * (seg > 0)[..., None]), (y, aux["dropped_fraction"])

  f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  if mesh_shape is None:
    return f(params, x)
  mesh = jax.make_mesh(mesh_shape, AXES, axis_types=(AxisType.Auto,) * 5)
  with jax.set_mesh(mesh):
    spec = fit_spec(P(("data", "fsdp", "expert")), x.shape, dict(mesh.shape))
    return f(params, jax.device_put(x, NamedSharding(mesh, spec)))


def _close(a, b):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-5)


CASES = [("all_to_all", 8.0, "topk_groups", "data2_expert4"),
         ("ragged_all_to_all", 1.0, "topk_groups", "data2_expert4"),
         ("ragged_all_to_all", 1.0, "topk", "data2_expert4"),
         ("ragged_all_to_all", 1.0, "topk", "fsdp2_expert2_tensor2"),
         ("ragged_all_to_all", 1.0, "dynamic", "expert8")] + [(mode, factor, "topk", mesh) for mode, factor in [("all_gather", 1.0), ("all_to_all", 8.0)]
         for mesh in MESHES] + [(mode, factor, "dynamic", mesh)
                                for mode, factor in [("all_gather", 1.0), ("all_to_all", 8.0)]
                                for mesh in ("data2_expert4", "fsdp2_expert2_tensor2")]


@pytest.mark.parametrize("mode, factor, router, mesh", CASES)
def test_dispatch_equals_one_device(mode, factor, router, mesh):
  """Dropless modes (all_to_all with room for every assignment) equal the local oracle: outputs at
  valid positions, the loss, and every gradient. ragged_all_to_all runs its bookkeeping with the
  collective emulated (XLA:CPU lacks it)."""
  platform = Platform(emulate_ragged=mode == "ragged_all_to_all")
  groups = dict(num_groups=4, max_groups=2, top_k=3) if router == "topk_groups" else {}
  cfg = MoEConfig(num_experts=8, expert_hidden=16, router=router.removesuffix("_groups"),
                  dispatch=mode, capacity_factor=factor, **groups)
  (ref_loss, (ref_y, _)), ref_grads = _run(cfg, None, platform=platform)
  (loss, (y, dropped)), grads = _run(cfg, MESHES[mesh], platform=platform)
  valid = np.asarray(_inputs()[1] > 0)
  np.testing.assert_allclose(np.asarray(y)[valid], np.asarray(ref_y)[valid], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  _close(grads, ref_grads)
  assert float(dropped) == 0.0


@pytest.mark.parametrize("mode", ["all_gather", "all_to_all", "ragged_all_to_all"])
def test_a_batch_the_mesh_does_not_divide(mode):
  """5 rows of 13 (65 tokens, e.g. eval prompts): rows stay whole on every device and the expert
  devices split the tokens unevenly; still the oracle."""
  platform = Platform(emulate_ragged=mode == "ragged_all_to_all")
  cfg = MoEConfig(num_experts=8, expert_hidden=16, dispatch=mode, capacity_factor=8.0)
  (ref_loss, (ref_y, _)), ref_grads = _run(cfg, None, 5, 13, platform)
  (loss, (y, dropped)), grads = _run(cfg, MESHES["data2_expert4"], 5, 13, platform)
  valid = np.asarray(_inputs(5, 13)[1] > 0)
  np.testing.assert_allclose(np.asarray(y)[valid], np.asarray(ref_y)[valid], rtol=1e-5, atol=1e-6)
  _close(grads, ref_grads)
  assert float(dropped) == 0.0


def test_all_to_all_drops_past_capacity_as_counted():
  """With a small capacity the rows dropped are exactly those past C in each (sender, receiver)
  pair, in token order, and the output is the oracle without the assignments they carried."""
  cfg = MoEConfig(num_experts=8, top_k=4, expert_hidden=16, dispatch="all_to_all",
                  capacity_factor=0.6)
  x, seg = _inputs()
  moe = MoE(D, cfg, rngs=nnx.Rngs(0))
  mesh = (1, 1, 4, 1, 1)                 # 2 experts a device: tokens share rows between them
  (_, (y, dropped)), _ = _run(cfg, mesh)
  # Recompute the routing on one device and apply the capacity rule in numpy.
  x_TxD = x.reshape(B * L, D)
  _, expert_TxK, weight_TxK = top_k_routing(x_TxD @ moe.router_DxE[...], cfg.top_k)
  expert = np.asarray(expert_TxK)
  G, S, K = 4, B * L // 4, cfg.top_k
  C = expert_parallel.capacity(cfg, S, G)
  assert C == int(np.ceil(0.6 * S * 4 / G))          # rows per token: min(k, G) = 4
  valid_T = np.asarray(seg > 0).reshape(-1)
  kept = np.zeros_like(expert, bool)
  received = [[] for _ in range(G)]                # per receiver: (token, slots) in arrival order
  rows = 0
  for src in range(G):
    taken = np.zeros(G, int)
    for t in range(src * S, (src + 1) * S):
      if not valid_T[t]:
        continue
      dests = expert[t] // (cfg.num_experts // G)
      for d in dict.fromkeys(dests):               # distinct devices, in slot order
        if taken[d] < C:
          received[d].append((t, np.flatnonzero(dests == d)))
        taken[d] += 1
        rows += 1
  # Senders' rows arrive in sender order; each receiver runs the first ceil(0.6 * S * k) of the
  # assignments they carry, in row and slot order.
  cap = int(np.ceil(0.6 * S * cfg.top_k))
  receiver_dropped = 0
  for d in range(G):
    done = 0
    for t, slots in received[d]:
      for j in slots:
        kept[t, j] = done < cap
        receiver_dropped += done >= cap
        done += 1
  assert rows < valid_T.sum() * K                    # tokens did share rows
  expected_dropped = (~kept & valid_T[:, None]).sum() / (valid_T.sum() * K)
  assert expected_dropped > 0.1 and receiver_dropped > 0     # both stages drop here
  assert float(dropped) == pytest.approx(expected_dropped, rel=1e-6)
  oracle = expert_parallel.swiglu_experts(
      x_TxD, expert_TxK, jnp.asarray(kept), weight_TxK, moe.w_gate_ExDxH[...],
      moe.w_up_ExDxH[...], moe.w_down_ExHxD[...], backend="blocked", block_rows=64)
  np.testing.assert_allclose(np.asarray(y).reshape(B * L, D)[valid_T],
                             np.asarray(oracle)[valid_T], rtol=1e-5, atol=1e-6)


def test_bad_dispatch_modes_are_refused_in_one_line():
  with pytest.raises(ValueError, match="must be one of") as e:
    MoE(D, MoEConfig(dispatch="alltoall"), rngs=nnx.Rngs(0))
  assert "\n" not in str(e.value)
  ragged = MoEConfig(dispatch="ragged_all_to_all")
  for platform in (Platform(), Platform("cpu")):       # the tests run on CPU
    with pytest.raises(ValueError, match="XLA:CPU does not implement ragged_all_to_all"):
      MoE(D, ragged, rngs=nnx.Rngs(0), platform=platform)
  # Built for an accelerator, or with the collective emulated, the same layer is accepted.
  for platform in (Platform("gpu"), Platform("tpu"), Platform(emulate_ragged=True)):
    assert MoE(D, ragged, rngs=nnx.Rngs(0), platform=platform).platform == platform
  with pytest.raises(ValueError, match="platform must be one of cpu, gpu, tpu, got 'cuda'"):
    Platform("cuda")


@pytest.mark.parametrize("platform, mesh, expected", [
    ("cpu", "data2_expert4", "all_gather"), ("gpu", "data2_expert4", "ragged_all_to_all"),
    ("tpu", "expert8", "ragged_all_to_all"), ("gpu", "data8", "all_gather"),
    ("gpu", None, "local")])
def test_auto_dispatch_by_platform_and_mesh(platform, mesh, expected):
  """auto: ragged_all_to_all on an accelerator with an expert axis; all_gather on CPU or with no
  expert axis; local on one device."""
  on = Platform(platform)
  m = None if mesh is None else jax.make_mesh(MESHES[mesh], AXES, axis_types=(AxisType.Auto,) * 5)
  assert expert_parallel.resolve_dispatch("auto", m, 8, on) == expected
  assert expert_parallel.resolve_dispatch("all_to_all", m, 8, on) == ("local" if m is None else "all_to_all")
  if m is not None and platform != "cpu":   # 6 experts: the expert axis does not split them
    assert expert_parallel.resolve_dispatch("auto", m, 6, on) == "all_gather"
    assert expert_parallel.resolve_dispatch("ragged_all_to_all", m, 6, on) == "all_gather"


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_ragged_all_to_all_lowers_for_gpu_and_tpu(platform):
  """The real collective (not the emulation), forward and backward of one MoE layer on data 2 x
  expert 4, lowered for CUDA and TPU with jax.export (no accelerator needed): 4 exchanges forward
  (tokens, weights, local expert ids, results back) and 3 backward (the custom VJP's reverse
  exchanges), each within one data replica's 4 expert devices."""
  from jax import export
  cfg = MoEConfig(num_experts=8, expert_hidden=16, dispatch="auto")
  built_for = Platform("gpu" if platform == "cuda" else platform)
  graphdef, params = nnx.split(MoE(D, cfg, rngs=nnx.Rngs(0), platform=built_for))
  x, seg = _inputs()

  def loss(params, x):
    y, _ = nnx.merge(graphdef, params)(x, seg)
    return jnp.sum(jnp.sin(y))

  mesh = jax.make_mesh(MESHES["data2_expert4"], AXES, axis_types=(AxisType.Auto,) * 5)
  with jax.set_mesh(mesh):
    x = jax.device_put(x, NamedSharding(mesh, P(("data", "expert"))))
    exported = export.export(
        jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), platforms=[platform],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("ragged_all_to_all")])(params, x)
  text = exported.mlir_module()
  calls = [line for line in text.splitlines() if "stablehlo.custom_call @ragged_all_to_all" in line]
  assert len(calls) == 7, len(calls)
  ids = np.vectorize(lambda d: d.id)(mesh.devices).reshape(2, 4)
  groups = "dense<" + str(ids.tolist()).replace(" ", "") + ">"
  assert all(groups in line.replace(" ", "") for line in calls), calls[0]
  assert exported.platforms == (platform,)


def test_group_limit_hand_case():
  # 2 tokens, 6 experts in 3 groups of 2; group score = sum of its two scores.
  scores = jnp.array([[0.30, 0.00, 0.20, 0.20, 0.25, 0.05],    # groups 0.30, 0.40, 0.30
                      [0.05, 0.05, 0.10, 0.00, 0.40, 0.40]])   # groups 0.10, 0.10, 0.80
  reach = np.asarray(group_limit(scores, num_groups=3, max_groups=1))
  np.testing.assert_array_equal(reach, [[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]])
  # Token 0's best single expert (0.30, group 0) is out of reach with one group: top-2 is 2, 3.
  _, expert, weight = top_k_routing(jnp.log(scores + 1e-9), 2, groups=(3, 1))
  np.testing.assert_array_equal(np.sort(np.asarray(expert[0])), [2, 3])
  np.testing.assert_allclose(weight[0], [0.5, 0.5], rtol=1e-6)


@pytest.mark.parametrize("router", ["topk", "dynamic"])
def test_max_groups_bounds_each_tokens_groups(router):
  E, G, M = 16, 8, 2
  cfg = MoEConfig(num_experts=E, top_k=4, k_max=4, router=router, num_groups=G, max_groups=M,
                  threshold_init=0.9)
  moe = MoE(D, cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (256, D))
  _, _, expert, _, used = moe.route(x, None, None)
  used = np.ones(expert.shape, bool) if used is None else np.asarray(used)
  groups = [set(np.asarray(expert)[t][used[t]] // (E // G)) for t in range(x.shape[0])]
  assert max(len(g) for g in groups) <= M
  assert max(len(g) for g in groups) == M          # the bound binds for some tokens
  # Without the limit some tokens do spread over more groups (so the test can fail).
  free = MoE(D, dataclasses.replace(cfg, max_groups=0), rngs=nnx.Rngs(0))
  _, _, expert0, _, used0 = free.route(x, None, None)
  used0 = np.ones(expert0.shape, bool) if used0 is None else np.asarray(used0)
  assert max(len(set(np.asarray(expert0)[t][used0[t]] // (E // G))) for t in range(256)) > M


def test_max_groups_equal_to_num_groups_changes_nothing():
  """The router skips the group limit when max_groups = num_groups; that is right only because
  the limit then keeps every expert in reach."""
  scores = jax.random.uniform(jax.random.key(3), (64, 8))
  assert np.all(np.asarray(group_limit(scores, num_groups=4, max_groups=4)))
  assert not np.all(np.asarray(group_limit(scores, num_groups=4, max_groups=3)))


def test_bad_group_settings_are_refused():
  with pytest.raises(ValueError, match="must divide model.moe.num_experts=8"):
    MoE(D, MoEConfig(num_experts=8, num_groups=3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="must leave the 2 experts a token may take in reach"):
    MoE(D, MoEConfig(num_experts=8, num_groups=8, max_groups=1, top_k=2), rngs=nnx.Rngs(0))

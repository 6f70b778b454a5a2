"""The KV cache (model/kv_cache.py, Decoder.decode): prefilling a prefix and then feeding one
position per step gives the logits of one forward pass over the whole sequence (the oracle), to
1e-5 in float32, on one device, on a (data 2 x expert 4) mesh with dropless dispatches, and with the
cache's length split over a context axis of 2."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from omnimoe.model import kv_cache
from omnimoe.model.config import ModelConfig, MoEConfig
from omnimoe.model.decoder import Decoder
from omnimoe.model.expert_parallel import Platform
from omnimoe.model.sharding import MESH_AXES
from omnimoe.model.synthetic import synthetic_batch

V, F, L, PREFIX = 64, 6, 24, 10
TINY = ModelConfig(num_layers=3, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                   rope_sections=(2, 1, 1), attention_block=8,
                   moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32, block_rows=8))
DYNAMIC = dataclasses.replace(
    TINY, num_dense_layers=1, scan_layers=True, local_layers=(1,), attention_window=5,
    moe=dataclasses.replace(TINY.moe, router="dynamic", k_max=3, bias_update_rate=1e-3))
CONTRACT = ("tokens", "features", "modality", "segment_ids", "positions")


def _router(cfg):
  """A router state away from its initial value (thresholds and biases that matter)."""
  M, E = cfg.num_moe_layers, cfg.moe.num_experts
  r = np.random.default_rng(5)
  state = {"threshold": np.linspace(0.3, 0.8, M).astype(np.float32)}
  if cfg.moe.bias_update_rate > 0:
    state["bias"] = r.normal(scale=0.05, size=(M, 3, E)).astype(np.float32)
  return state


def _cached_logits(model, batch, router):
  """Logits of every position: the first PREFIX in one call, then one position per call."""
  B = batch["tokens"].shape[0]
  prefill = jax.jit(lambda m, b, c, r: m.decode(b, c, r)[::2])
  step = jax.jit(lambda m, b, c, r: m.decode(b, c, r)[::2])
  cache = kv_cache.init_cache(model.cfg, B, L)
  cut = lambda a, b: {k: np.asarray(batch[k])[:, a:b] for k in CONTRACT}
  logits, cache = prefill(model, cut(0, PREFIX), cache, router)
  out = [np.asarray(logits)]
  for i in range(PREFIX, L):
    logits, cache = step(model, cut(i, i + 1), cache, router)
    out.append(np.asarray(logits))
  assert int(cache["end"]) == L
  return np.concatenate(out, axis=1), cache


def _compare(cfg, mesh_shape=None, platform=Platform(), batch_size=2):
  batch = synthetic_batch(batch_size, L, V, F, seed=4, max_doc=14, pad=2)
  router = _router(cfg)
  graphdef, params = nnx.split(Decoder(cfg, vocab_size=V, feature_dim=F, rngs=nnx.Rngs(0),
                                       platform=platform))
  full = jax.jit(lambda p, b, r: nnx.merge(graphdef, p)(b, r)[0])
  model = lambda p: nnx.merge(graphdef, p)
  if mesh_shape is None:
    want = np.asarray(full(params, batch, router))
    got, cache = _cached_logits(model(params), batch, router)
  else:
    mesh = jax.make_mesh(mesh_shape, MESH_AXES, axis_types=(AxisType.Auto,) * 5)
    with jax.set_mesh(mesh):
      want = np.asarray(full(params, batch, router))
      got, cache = _cached_logits(model(params), batch, router)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  return want, cache


def test_cached_decoding_equals_recompute_on_one_device():
  """Dynamic router with balance biases, a dense first block, scanned MoE blocks, a local layer."""
  logits, _ = _compare(DYNAMIC)
  assert np.abs(logits).max() > 0.1        # not trivially equal


@pytest.mark.parametrize("dispatch, cfg", [
    ("all_gather", TINY),
    pytest.param("ragged_all_to_all", DYNAMIC, marks=pytest.mark.slow)],
    ids=["all_gather_topk_unrolled", "ragged_dynamic_scanned"])
def test_cached_decoding_equals_recompute_on_data2_expert4(dispatch, cfg):
  """Dropless dispatches over the expert axis (ragged_all_to_all with its collective emulated)."""
  platform = Platform(emulate_ragged=dispatch == "ragged_all_to_all")
  cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch=dispatch))
  _compare(cfg, (2, 1, 4, 1, 1), platform, batch_size=8)


def test_cached_decoding_equals_recompute_with_the_length_over_context():
  """data 2 x expert 2 x context 2: the cache's slots split over `context` (its "length" axis),
  the dynamic router, scanned MoE blocks and a local layer; the same logits as the recompute."""
  cfg = dataclasses.replace(DYNAMIC, moe=dataclasses.replace(DYNAMIC.moe, dispatch="all_gather"))
  _, cache = _compare(cfg, (2, 1, 2, 1, 2), Platform(), batch_size=8)
  assert cache["blocks"][0]["k"].sharding.spec[:2] == (("data", "expert"), "context")
  assert cache["moe_stack"]["k"].sharding.spec[2] == "context"


def test_cache_shapes_and_bytes_per_token():
  cache = kv_cache.init_cache(DYNAMIC, 3, 7)
  assert len(cache["blocks"]) == 1 and cache["blocks"][0]["k"].shape == (3, 7, 2, 8)
  assert cache["moe_stack"]["v"].shape == (2, 3, 7, 2, 8)
  assert cache["segment_ids"].shape == (3, 7) and int(cache["end"]) == 0
  assert kv_cache.bytes_per_token(TINY) == 2 * 3 * 2 * 8 * 4

"""The full Decoder: contract shapes, aux data, causality and segment isolation via gradients."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from omnimoe.model.config import ModelConfig, MoEConfig
from omnimoe.model.decoder import Decoder
from omnimoe.model.expert_parallel import Platform
from omnimoe.model.sharding import MESH_AXES
from omnimoe.model.synthetic import synthetic_batch

V, F = 64, 6
TINY = ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                   rope_sections=(2, 1, 1), attention_block=8,
                   moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32, block_rows=8))


def _decoder(cfg=TINY):
  return Decoder(cfg, vocab_size=V, feature_dim=F, rngs=nnx.Rngs(0))


def test_shapes_dtypes_and_aux():
  batch = synthetic_batch(3, 16, V, F, seed=1)
  logits, aux = jax.jit(lambda m, b: m(b))(_decoder(), batch)
  assert logits.shape == (3, 16, V) and logits.dtype == jnp.float32
  assert aux["load_balance_loss"].shape == () and aux["router_z_loss"].shape == ()
  assert aux["expert_load"].shape == (TINY.num_layers, 4)
  assert aux["expert_load_by_modality"].shape == (TINY.num_layers, 4, 4)
  np.testing.assert_allclose(aux["expert_load"].sum(-1), 1.0, rtol=1e-6)
  assert np.all(np.isfinite(logits))
  assert float(aux["load_balance_loss"]) > 0 and float(aux["router_z_loss"]) > 0


def test_bfloat16_compute_returns_float32_logits():
  cfg = dataclasses.replace(TINY, dtype="bfloat16")
  batch = synthetic_batch(2, 16, V, F, seed=2)
  logits, aux = jax.jit(lambda m, b: m(b))(_decoder(cfg), batch)
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
  assert np.isfinite(float(aux["load_balance_loss"]))


def _causal_batch():
  B, L = 2, 16
  seg = np.zeros((B, L), np.int32)
  seg[0, :6], seg[0, 6:13] = 1, 2          # row 0: two documents + 3 padding
  seg[1, :4], seg[1, 4:16] = 1, 2          # row 1: two documents, no padding
  r = np.random.default_rng(0)
  modality = np.where(seg > 0, r.integers(2, 4, (B, L)), 0).astype(np.int8)  # image / audio
  pos = np.zeros((B, L), np.int32)
  for b in range(B):
    for s in (1, 2):
      pos[b, seg[b] == s] = np.arange((seg[b] == s).sum())
  return {
      "tokens": r.integers(0, V, (B, L)).astype(np.int32),
      "features": r.normal(size=(B, L, F)).astype(np.float32),
      "modality": modality, "segment_ids": seg,
      "positions": np.repeat(pos[..., None], 3, -1),
  }


DYNAMIC = dataclasses.replace(TINY.moe, router="dynamic", k_min=1, k_max=3, threshold_init=0.6)


@pytest.mark.parametrize("attention,moe", [("xla", TINY.moe), ("blockwise", TINY.moe),
                                           ("xla", DYNAMIC)], ids=["xla", "blockwise", "dynamic"])
def test_causality_and_segment_isolation_through_gradients(attention, moe):
  cfg = dataclasses.replace(TINY, attention=attention, attention_block=4, moe=moe)
  model = _decoder(cfg)
  batch = _causal_batch()
  proj = jax.random.normal(jax.random.key(5), (V,))

  def per_position(features):
    logits, _ = model(dict(batch, features=features))
    return logits @ proj                                    # [B, L]

  jac = np.asarray(jax.jit(jax.jacrev(per_position))(jnp.asarray(batch["features"])))
  jac = np.abs(jac).sum(-1)                                 # [B, L, B, L]: |d out[b,i] / d in[c,j]|
  seg = batch["segment_ids"]
  B, L = seg.shape
  for b in range(B):
    for i in range(L):
      if seg[b, i] == 0:
        continue
      for c in range(B):
        for j in range(L):
          visible = c == b and j <= i and seg[c, j] == seg[b, i]
          if not visible:
            assert jac[b, i, c, j] == 0.0, (b, i, c, j)
      assert jac[b, i, b, i] > 0                          # the test can fail
  assert jac[0, 5, 0, 0] > 0 and jac[1, 15, 1, 4] > 0     # earlier tokens of the same document


def test_text_positions_use_the_table_and_media_the_features():
  model = _decoder()
  batch = _causal_batch()
  batch["modality"] = batch["modality"].copy()
  batch["modality"][0, 0] = 1                               # make one position text
  x = model.embed(jnp.asarray(batch["tokens"]), jnp.asarray(batch["features"]),
                  jnp.asarray(batch["modality"], jnp.int32))
  np.testing.assert_allclose(x[0, 0], model.embed.table_VxD[...][batch["tokens"][0, 0]])
  m = int(batch["modality"][0, 1]) - 2
  want = batch["features"][0, 1] @ model.embed.proj_MxFxD[...][m] + model.embed.bias_MxD[...][m]
  np.testing.assert_allclose(x[0, 1], want, rtol=1e-5, atol=1e-5)


def test_first_layers_dense():
  cfg = dataclasses.replace(TINY, num_layers=3, num_dense_layers=2, dense_hidden=24)
  model = _decoder(cfg)
  assert [b.dense for b in model.blocks] == [True, True, False]
  assert model.blocks[0].mlp.w_up_DxH.shape == (cfg.d_model, 24)
  assert not hasattr(model.blocks[0], "moe") and not hasattr(model.blocks[2], "mlp")
  graphdef, state = nnx.split(model)

  def loss(state, batch):
    logits, aux = nnx.merge(graphdef, state)(batch)
    return jnp.sum(logits ** 2), (logits, aux)

  (_, (logits, aux)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      state, synthetic_batch(2, 16, V, F, seed=1))
  assert aux["expert_load"].shape == (1, 4) and aux["active_fraction"].shape == (1,)
  np.testing.assert_array_equal(aux["moe_layers"], [2])
  assert np.all(np.isfinite(logits))
  assert float(jnp.abs(g["blocks"][0]["mlp"]["w_gate_DxH"][...]).max()) > 0   # in the gradient path


def test_the_platform_it_is_built_for_reaches_every_moe_layer():
  """ragged_all_to_all is refused on CPU and accepted with the collective emulated; with auto on
  an expert axis, the program built for a GPU exchanges rows (the emulated ragged exchange is an
  all_to_all) in both MoE layers, the one built for this CPU gathers them."""
  ragged = dataclasses.replace(TINY, moe=dataclasses.replace(TINY.moe, dispatch="ragged_all_to_all"))
  with pytest.raises(ValueError, match="XLA:CPU does not implement ragged_all_to_all"):
    _decoder(ragged)
  gpu = Platform("gpu", emulate_ragged=True)
  assert Decoder(ragged, vocab_size=V, feature_dim=F, rngs=nnx.Rngs(0), platform=gpu)
  mesh = jax.make_mesh((2, 1, 4, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 5)
  batch = synthetic_batch(8, 16, V, F, seed=3)

  def lowered(platform):
    graphdef, params = nnx.split(Decoder(TINY, vocab_size=V, feature_dim=F, rngs=nnx.Rngs(0),
                                         platform=platform))
    with jax.set_mesh(mesh):
      return jax.jit(lambda p, b: nnx.merge(graphdef, p)(b)).lower(params, batch).as_text()

  on_gpu, on_cpu = lowered(gpu), lowered(Platform())
  # Per MoE layer: 3 all_to_alls trade the sizes and offsets, then 4 emulated ragged exchanges
  # (tokens, weights, expert ids, results back) of 2 each.
  assert on_gpu.count("stablehlo.all_to_all") == 2 * (3 + 4 * 2)
  assert "all_to_all" not in on_cpu and "all_gather" in on_cpu

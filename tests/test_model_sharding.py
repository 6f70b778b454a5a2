"""Sharded creation and application exactly as the trainer does it, on the 8 simulated CPU devices.

As train/state.py does: the Decoder is built with the mesh it is laid out on (`mesh=` the abstract
mesh; its calls then trace under it, so the activation constraints and the experts' shard_map
run), parameters are created by a jitted init with `out_shardings`, and the model is the graphdef
merged with them. The reference is the same Decoder built without a mesh, on one device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from omnimoe.model.config import ModelConfig, MoEConfig
from omnimoe.model.decoder import Decoder
from omnimoe.model.sharding import (MESH_AXES, constrain, fit_spec, logical_to_mesh_spec,
                            param_shardings)
from omnimoe.model.synthetic import synthetic_batch
from omnimoe.train.mesh import batch_sharding

V, F, D, E, H = 64, 6, 32, 4, 32
CFG = ModelConfig(num_layers=2, d_model=D, num_heads=4, num_kv_heads=2, head_dim=8,
                  rope_sections=(2, 1, 1),
                  moe=MoEConfig(num_experts=E, top_k=2, expert_hidden=H, block_rows=8))


def _make(mesh=None):
  return Decoder(CFG, vocab_size=V, feature_dim=F, rngs=nnx.Rngs(0), mesh=mesh)


def _mesh(shape, axis_type=AxisType.Auto):
  return jax.make_mesh(shape, MESH_AXES, axis_types=(axis_type,) * len(MESH_AXES))


def _sharded_init_and_apply(mesh, batch):
  """(params, logits, aux, the jaxpr of the apply) with the model built as train/state.py builds it."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _make(mesh.abstract_mesh)))
  shardings = param_shardings(abstract, mesh)
  params = jax.jit(lambda: nnx.state(_make()), out_shardings=shardings)()
  batch = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch.items()}
  apply = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b))
  logits, aux = apply(params, batch)
  return params, logits, aux, str(jax.make_jaxpr(apply)(params, batch))


@pytest.fixture(scope="module")
def single_device():
  batch = synthetic_batch(8, 16, V, F, seed=0)
  return (batch, *jax.jit(lambda m, b: m(b))(_make(), batch))


@pytest.mark.parametrize("shape,expected", [
    # (data, fsdp, expert, tensor, context) -> shard shapes of a few parameters
    ((8, 1, 1, 1, 1), {"w_gate": (E, D, H), "table": (V, D), "head": (D, V), "wq": (D, 4, 8)}),
    ((2, 2, 2, 1, 1), {"w_gate": (E // 2, D // 2, H), "table": (V, D // 2),
                       "head": (D // 2, V), "wq": (D // 2, 4, 8)}),
    ((1, 2, 1, 4, 1), {"w_gate": (E, D // 2, H // 4), "table": (V // 4, D // 2),
                       "head": (D // 2, V // 4), "wq": (D // 2, 1, 8)}),
])
def test_sharded_init_and_apply_match_single_device(shape, expected, single_device):
  batch, ref_logits, ref_aux = single_device
  params, logits, aux, jaxpr = _sharded_init_and_apply(_mesh(shape), batch)
  # The trainer's path ran: activation constraints and the experts inside shard_map.
  assert "sharding_constraint" in jaxpr and "shard_map" in jaxpr

  block = params["blocks"][0]
  got = {
      "w_gate": block["moe"]["w_gate_ExDxH"][...],
      "table": params["embed"]["table_VxD"][...],
      "head": params["head_DxV"][...],
      "wq": block["attn"]["wq_DxHxDh"][...],
  }
  for name, arr in got.items():
    assert arr.sharding.shard_shape(arr.shape) == expected[name], name
    assert {s.data.shape for s in arr.addressable_shards} == {expected[name]}, name
  # Same parameters (up to 1 ulp: jitted vs eager sampling) and the same function as on one device.
  np.testing.assert_allclose(got["w_gate"], _make().blocks[0].moe.w_gate_ExDxH[...], rtol=1e-6)
  # float32 sums in another order: measured at most 1.7e-6 on logits of scale 4.8, 2.4e-7 on the
  # z-loss (3.1), the expert loads exact.
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())
  for k in ("load_balance_loss", "router_z_loss", "expert_load"):
    np.testing.assert_allclose(aux[k], ref_aux[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_explicit_mesh_is_refused_with_a_clear_error():
  batch = synthetic_batch(8, 16, V, F, seed=0)
  with pytest.raises(ValueError, match="AxisType.Auto"):
    _sharded_init_and_apply(_mesh((8, 1, 1, 1, 1), AxisType.Explicit), batch)


def test_rules_and_fitting():
  assert logical_to_mesh_spec(("batch", "length", "act_embed")) == P(("data", "fsdp", "expert"), "context",
                                                                    None)
  assert logical_to_mesh_spec(("exp", "embed", "mlp")) == P("expert", "fsdp", "tensor")
  with pytest.raises(KeyError, match="no rule"):
    logical_to_mesh_spec(("embedding",))
  sizes = {"data": 2, "fsdp": 4, "expert": 1, "tensor": 2, "context": 1}
  # A non-dividing axis is dropped; an axis used twice is used once; absent axes vanish.
  assert fit_spec(P("tensor", "fsdp"), (3, 8), sizes) == P(None, "fsdp")
  assert fit_spec(P(("data", "fsdp"), "fsdp"), (8, 8), sizes) == P(("data", "fsdp"), None)
  assert fit_spec(P("nonexistent"), (8,), sizes) == P(None)


def test_constrain_is_a_no_op_outside_a_mesh():
  x = jnp.ones((4, 8))
  assert constrain(x, ("batch", "act_embed")) is x

"""A dense SwiGLU feed-forward: the dense layers (`model.num_dense_layers`) and the MoE layer's
shared experts (`model.moe.num_shared_experts`)."""
import jax
import jax.numpy as jnp
from flax import nnx

from omnimoe.model.sharding import param


class SwiGLU(nnx.Module):
  """x_...xD -> (silu(x W_gate) * (x W_up)) W_down, hidden width H, in the compute dtype."""

  def __init__(self, d_model: int, hidden: int, *, dtype="float32", param_dtype="float32",
               rngs: nnx.Rngs):
    D, H = d_model, hidden
    normal = jax.nn.initializers.normal
    self.dtype = jnp.dtype(dtype)
    self.w_gate_DxH = param(rngs, normal(D ** -0.5), (D, H), ("embed", "mlp"), param_dtype)
    self.w_up_DxH = param(rngs, normal(D ** -0.5), (D, H), ("embed", "mlp"), param_dtype)
    self.w_down_HxD = param(rngs, normal(H ** -0.5), (H, D), ("mlp", "embed"), param_dtype)

  def __call__(self, x_NxD: jax.Array) -> jax.Array:
    x_NxD = x_NxD.astype(self.dtype)
    w = lambda v: v[...].astype(self.dtype)
    h_NxH = jax.nn.silu(x_NxD @ w(self.w_gate_DxH)) * (x_NxD @ w(self.w_up_DxH))
    return h_NxH @ w(self.w_down_HxD)

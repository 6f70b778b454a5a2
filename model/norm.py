"""RMSNorm, computed in float32 and returned in the compute dtype."""
import jax
import jax.numpy as jnp
from flax import nnx

from omnimoe.model.sharding import param


class RMSNorm(nnx.Module):
  """y = x / rms(x) * scale over the last axis (scale starts at 1)."""

  def __init__(self, dim: int, *, eps: float = 1e-6, dtype="float32", param_dtype="float32",
               names=(None,), rngs: nnx.Rngs):
    self.eps = eps
    self.dtype = jnp.dtype(dtype)
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), names, param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)

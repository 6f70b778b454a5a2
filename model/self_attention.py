"""Self-attention block: GQA projections, optional QK-norm, M-RoPE, then attention (over the
`context` mesh axis when the mesh has one: model/context_parallel.py)."""
import jax
import jax.numpy as jnp
from flax import nnx

from omnimoe.model.config import ModelConfig, check_heads
from omnimoe.model.blockwise_attention import NO_WINDOW
from omnimoe.model.context_parallel import attend_over_context
from omnimoe.model.norm import RMSNorm
from omnimoe.model.rope import apply_rope
from omnimoe.model.sharding import constrain, param

HEADS = ("batch", "length", "act_heads", None)


class SelfAttention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    D, H, K, Dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    check_heads(H, K)
    self.cfg = cfg
    self.dtype = jnp.dtype(cfg.dtype)
    normal = jax.nn.initializers.normal
    pd = cfg.param_dtype
    self.wq_DxHxDh = param(rngs, normal(D ** -0.5), (D, H, Dh), ("embed", "heads", "kv"), pd)
    self.wk_DxKxDh = param(rngs, normal(D ** -0.5), (D, K, Dh), ("embed", "heads", "kv"), pd)
    self.wv_DxKxDh = param(rngs, normal(D ** -0.5), (D, K, Dh), ("embed", "heads", "kv"), pd)
    self.wo_HxDhxD = param(rngs, normal((H * Dh) ** -0.5), (H, Dh, D), ("heads", "kv", "embed"),
                          pd)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(Dh, dtype=cfg.dtype, param_dtype=pd, names=("kv",), rngs=rngs)
      self.k_norm = RMSNorm(Dh, dtype=cfg.dtype, param_dtype=pd, names=("kv",), rngs=rngs)

  def __call__(self, x_BxLxD: jax.Array, segment_ids_BxL: jax.Array,
               angles_BxLxP: jax.Array, order_BxL: jax.Array | None = None,
               window: jax.Array | int = NO_WINDOW) -> jax.Array:
    cfg = self.cfg
    dt = self.dtype
    x = x_BxLxD.astype(dt)
    with jax.named_scope("qkv"):
      # One matmul for q, k and v (weights concatenated along the heads axis).
      w_DxNxDh = jnp.concatenate(
          [self.wq_DxHxDh[...], self.wk_DxKxDh[...], self.wv_DxKxDh[...]], axis=1).astype(dt)
      qkv_BxLxNxDh = jnp.einsum("bld,dnk->blnk", x, w_DxNxDh)
      H, K = cfg.num_heads, cfg.num_kv_heads
      q_BxLxHxD = qkv_BxLxNxDh[:, :, :H]
      k_BxLxKxD = qkv_BxLxNxDh[:, :, H:H + K]
      v_BxLxKxD = qkv_BxLxNxDh[:, :, H + K:]
      if cfg.qk_norm:
        q_BxLxHxD, k_BxLxKxD = self.q_norm(q_BxLxHxD), self.k_norm(k_BxLxKxD)
    with jax.named_scope("rope"):
      q_BxLxHxD = constrain(apply_rope(q_BxLxHxD, angles_BxLxP), HEADS)
      k_BxLxKxD = constrain(apply_rope(k_BxLxKxD, angles_BxLxP), HEADS)
    with jax.named_scope("attend"):
      o_BxLxHxD = attend_over_context(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL,
                                      order_BxL, strategy=cfg.context_parallel,
                                      implementation=cfg.attention, block=cfg.attention_block,
                                      window=window)
    return jnp.einsum("blhk,hkd->bld", o_BxLxHxD, self.wo_HxDhxD[...].astype(dt))

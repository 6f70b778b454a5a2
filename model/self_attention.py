"""Self-attention block: GQA projections, optional QK-norm, M-RoPE, then attention (over the
`context` mesh axis when the mesh has one: model/context_parallel.py); `cached` runs the same
layer on new positions against a KV cache (model/kv_cache.py)."""
import jax
import jax.numpy as jnp
from flax import nnx

from omnimoe.model.config import ModelConfig, check_heads
from omnimoe.model.blockwise_attention import NO_WINDOW
from omnimoe.model.context_parallel import attend_over_context
from omnimoe.model.kv_cache import write_and_attend
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

  def project(self, x_BxLxD: jax.Array, angles_BxLxP: jax.Array):
    """(q [B, L, H, Dh], k [B, L, K, Dh], v [B, L, K, Dh]): projections, QK-norm and M-RoPE."""
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
    return q_BxLxHxD, k_BxLxKxD, v_BxLxKxD

  def out(self, o_BxLxHxD: jax.Array) -> jax.Array:
    return jnp.einsum("blhk,hkd->bld", o_BxLxHxD, self.wo_HxDhxD[...].astype(self.dtype))

  def __call__(self, x_BxLxD: jax.Array, segment_ids_BxL: jax.Array,
               angles_BxLxP: jax.Array, order_BxL: jax.Array | None = None,
               window: jax.Array | int = NO_WINDOW) -> jax.Array:
    cfg = self.cfg
    q_BxLxHxD, k_BxLxKxD, v_BxLxKxD = self.project(x_BxLxD, angles_BxLxP)
    with jax.named_scope("attend"):
      o_BxLxHxD = attend_over_context(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL,
                                      order_BxL, strategy=cfg.context_parallel,
                                      implementation=cfg.attention, block=cfg.attention_block,
                                      window=window)
    return self.out(o_BxLxHxD)

  def cached(self, x_BxLxD: jax.Array, segment_ids_BxL: jax.Array, angles_BxLxP: jax.Array,
             kv: dict, cache_seg_BxS: jax.Array, end: jax.Array,
             window: jax.Array | int = NO_WINDOW) -> tuple[jax.Array, dict]:
    """The L new positions appended to this layer's KV cache `kv` (model/kv_cache.py), attending
    over every slot of it. -> (output [B, L, D], kv)."""
    q_BxLxHxD, k_BxLxKxD, v_BxLxKxD = self.project(x_BxLxD, angles_BxLxP)
    with jax.named_scope("attend_cached"):
      o_BxLxHxD, kv = write_and_attend(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, kv, segment_ids_BxL,
                                       cache_seg_BxS, end, window, self.cfg)
    return self.out(o_BxLxHxD), kv

"""The decoder: multimodal embedding, pre-norm blocks of attention + MoE, final norm, output head.

`Decoder(cfg, vocab_size=V, feature_dim=F, rngs=...)(batch) -> (logits_BxLxV float32, aux)`.
The batch is the data contract (tokens, features, modality, segment_ids, positions; targets and
loss_weights are ignored). aux: load_balance_loss and router_z_loss (scalars, mean over layers),
expert_load [num_layers, E] and expert_load_by_modality [num_layers, 3, E] (text, image, audio).
Blocks run in a Python loop (compile time grows with num_layers).
"""
import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.embed import MultimodalEmbed
from model.moe import MoE
from model.norm import RMSNorm
from model.rope import rope_angles
from model.self_attention import SelfAttention
from model.sharding import constrain, param, require_auto_axes

ACT = ("batch", "length", "act_embed")


class Block(nnx.Module):
  """x + attn(norm(x)), then + moe(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.attn_norm = RMSNorm(cfg.d_model, names=("embed",), **kw)
    self.attn = SelfAttention(cfg, rngs=rngs)
    self.moe_norm = RMSNorm(cfg.d_model, names=("embed",), **kw)
    self.moe = MoE(cfg.d_model, cfg.moe, **kw)

  def __call__(self, x_BxLxD, segment_ids_BxL, modality_BxL, angles_BxLxP):
    with jax.named_scope("attention"):
      x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), segment_ids_BxL, angles_BxLxP)
    with jax.named_scope("moe"):
      y_BxLxD, aux = self.moe(self.moe_norm(x_BxLxD), segment_ids_BxL, modality_BxL)
    return constrain(x_BxLxD + y_BxLxD, ACT), aux


class Decoder(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, vocab_size: int, feature_dim: int, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = MultimodalEmbed(vocab_size, feature_dim, cfg.d_model, dtype=cfg.dtype,
                                 param_dtype=cfg.param_dtype, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, names=("embed",), dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, rngs=rngs)
    self.head_DxV = param(rngs, jax.nn.initializers.normal(cfg.d_model ** -0.5),
                          (cfg.d_model, vocab_size), ("embed", "vocab"), cfg.param_dtype)

  def __call__(self, batch: dict) -> tuple[jax.Array, dict]:
    cfg = self.cfg
    require_auto_axes(batch["segment_ids"])
    segment_ids_BxL = jnp.asarray(batch["segment_ids"], jnp.int32)
    modality_BxL = jnp.asarray(batch["modality"], jnp.int32)
    angles_BxLxP = rope_angles(jnp.asarray(batch["positions"]), cfg.head_dim, cfg.rope_sections,
                               cfg.rope_theta)
    with jax.named_scope("embed"):
      x_BxLxD = self.embed(jnp.asarray(batch["tokens"], jnp.int32),
                           jnp.asarray(batch["features"]), modality_BxL)
    x_BxLxD = constrain(x_BxLxD, ACT)
    auxes = []
    for block in self.blocks:
      x_BxLxD, aux = block(x_BxLxD, segment_ids_BxL, modality_BxL, angles_BxLxP)
      auxes.append(aux)
    with jax.named_scope("head"):
      h_BxLxD = self.final_norm(x_BxLxD)
      logits_BxLxV = jnp.einsum("bld,dv->blv", h_BxLxD, self.head_DxV[...].astype(h_BxLxD.dtype),
                                preferred_element_type=jnp.float32)
    logits_BxLxV = constrain(logits_BxLxV, ("batch", "length", "act_vocab"))
    stacked = {k: jnp.stack([a[k] for a in auxes]) for k in auxes[0]}
    aux = dict(stacked, load_balance_loss=stacked["load_balance_loss"].mean(),
               router_z_loss=stacked["router_z_loss"].mean())
    return logits_BxLxV, aux

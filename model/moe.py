"""Mixture-of-Experts feed-forward layer with SwiGLU experts (dropless unless all_to_all).

Tokens are flattened (T = B*L; B-major, or device by device under context parallelism:
model/expert_parallel.py `flatten_tokens`). The router picks each token's experts into a static [T, K] layout
(K = top_k for router "topk"; K = k_max for router "dynamic", whose unused slots have weight 0 and
take no row); with `max_groups` a token's experts come from at most that many of `num_groups`
expert groups. The routing and its statistics are computed over the whole (global) batch; the
experts then run through model/expert_parallel.py: on one device the assignments are laid out by
expert once and three grouped matmuls run on that layout (gate, up, down); on a mesh the same
happens per device inside shard_map after an all_gather or all_to_all exchange over `expert`.
Each token sums its experts' outputs weighted by the renormalised probabilities of the experts it
took; `num_shared_experts` adds one dense SwiGLU of that many experts' width that every token uses.
Padding tokens (segment_ids == 0) are routed and computed like any token (static shapes, no
branch; all_to_all gives them 0 instead), but excluded from every statistic and loss.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from omnimoe.model.expert_parallel import Platform, resolve_dispatch, routed_experts
from omnimoe.model.token_layout import (constrain_tokens, flatten_tokens, token_layout,
                                        unflatten_tokens)
from omnimoe.model.config import MoEConfig, check_moe_layer, one_of
from omnimoe.model.mlp import SwiGLU
from omnimoe.model.router import LONE_EXPERT, balance_stats, dynamic_routing, top_k_routing
from omnimoe.model.sharding import param

ROUTERS = ("topk", "dynamic")


class MoE(nnx.Module):
  """(x_BxLxD, segment_ids, modality, threshold) -> (y_BxLxD, aux).

  aux: load_balance_loss, router_z_loss, expert_load [E], active_fraction (mean experts taken / E),
  dropped_fraction (valid assignments the all_to_all capacity dropped / all valid ones; 0 in the
  dropless modes), expert_choice int32 [T, K] (each token's experts in the flattened token order,
  -1 in unused slots and for padding tokens), and with modality expert_load_by_modality [M, E],
  active_fraction_by_modality [M] and coactivation_by_modality [M, E, E] (M: the modality table) (model/router.py
  `balance_stats`).
  `threshold` (float32 scalar) is the dynamic router's mass threshold, an input kept by the
  trainer's controller (None: `cfg.threshold_init`); the top-k router ignores it. `bias_MxE`
  (float32 [M, E], needs modality) is the auxiliary-loss-free balance bias per modality: it ranks
  experts, it does not weight them (None: no bias).
  `platform` (model/expert_parallel.py `Platform`) is what the experts are built for: it decides
  what dispatch `auto` becomes and whether ragged_all_to_all runs (or is emulated) on CPU."""

  def __init__(self, d_model: int, cfg: MoEConfig, *, dtype="float32", param_dtype="float32",
               rngs: nnx.Rngs, platform: Platform = Platform()):
    E, D, H = cfg.num_experts, d_model, cfg.expert_hidden
    one_of("model.moe.router", cfg.router, ROUTERS)
    one_of("model.moe.lone_expert", cfg.lone_expert, LONE_EXPERT)
    check_moe_layer(cfg)                                  # one place for the MoE numbers
    resolve_dispatch(cfg.dispatch, None, E, platform)   # a bad mode fails when it is built
    self.cfg = cfg
    self.platform = platform   # what the experts are built for (model/expert_parallel.py)
    self.dtype = jnp.dtype(dtype)
    normal = jax.nn.initializers.normal
    # The router is kept and computed in float32 whatever param_dtype is.
    self.router_DxE = param(rngs, normal(D ** -0.5), (D, E), ("embed", None), jnp.float32)
    self.w_gate_ExDxH = param(rngs, normal(D ** -0.5), (E, D, H), ("exp", "embed", "mlp"),
                              param_dtype)
    self.w_up_ExDxH = param(rngs, normal(D ** -0.5), (E, D, H), ("exp", "embed", "mlp"),
                            param_dtype)
    self.w_down_ExHxD = param(rngs, normal(H ** -0.5), (E, H, D), ("exp", "mlp", "embed"),
                              param_dtype)
    if cfg.num_shared_experts > 0:   # absent otherwise: the parameter tree stays as it was
      self.shared = SwiGLU(D, cfg.num_shared_experts * H, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)

  def route(self, x_TxD: jax.Array, threshold: jax.Array | None, bias_TxE: jax.Array | None):
    """-> (probs_TxE, logits_TxE, expert_TxK, weight_TxK, used_TxK or None)."""
    cfg = self.cfg
    logits_TxE = x_TxD.astype(jnp.float32) @ self.router_DxE[...]
    groups = (cfg.num_groups, cfg.max_groups)
    if cfg.router == "dynamic":
      threshold = cfg.threshold_init if threshold is None else threshold
      probs_TxE, expert_TxK, weight_TxK, used_TxK = dynamic_routing(
          logits_TxE, jnp.asarray(threshold, jnp.float32), cfg.k_min, cfg.k_max, bias_TxE, groups,
          cfg.lone_expert)
    else:
      probs_TxE, expert_TxK, weight_TxK = top_k_routing(logits_TxE, cfg.top_k, bias_TxE, groups,
                                                         cfg.lone_expert)
      used_TxK = None
    return probs_TxE, logits_TxE, expert_TxK, weight_TxK, used_TxK

  def __call__(self, x_BxLxD: jax.Array, segment_ids_BxL: jax.Array,
               modality_BxL: jax.Array | None = None, *, threshold: jax.Array | None = None,
               bias_MxE: jax.Array | None = None) -> tuple[jax.Array, dict]:
    cfg = self.cfg
    B, L, D = x_BxLxD.shape
    T = B * L
    layout = token_layout(B, L)        # T's order: each device's tokens contiguous
    x_TxD = constrain_tokens(flatten_tokens(x_BxLxD, layout).astype(self.dtype), B, L)
    valid_T = flatten_tokens(segment_ids_BxL, layout) > 0
    modality_T = None if modality_BxL is None else flatten_tokens(modality_BxL, layout)

    with jax.named_scope("router"):
      bias_TxE = None
      if bias_MxE is not None:   # per modality; padding (0) uses the text row, and is not counted
        m_T = jnp.clip(modality_T - 1, 0, bias_MxE.shape[0] - 1)
        bias_TxE = jnp.take(bias_MxE, m_T, axis=0)
      probs_TxE, logits_TxE, expert_TxK, weight_TxK, used_TxK = self.route(x_TxD, threshold,
                                                                            bias_TxE)
      aux = balance_stats(logits_TxE, probs_TxE, expert_TxK, valid_T, modality_T, used_TxK)
      taken_TxK = valid_T[:, None] if used_TxK is None else used_TxK & valid_T[:, None]
      aux["expert_choice"] = jnp.where(taken_TxK, expert_TxK, -1)
    with jax.named_scope("experts"):   # model/expert_parallel.py: local or over the mesh
      used_TxK = jnp.ones(expert_TxK.shape, bool) if used_TxK is None else used_TxK
      y_TxD, dropped = routed_experts(x_TxD, expert_TxK, weight_TxK, used_TxK, valid_T,
                                      self.w_gate_ExDxH[...], self.w_up_ExDxH[...],
                                      self.w_down_ExHxD[...], cfg, batch_size=B,
                                      platform=self.platform)
      aux["dropped_fraction"] = dropped / jnp.maximum(jnp.sum(used_TxK & valid_T[:, None]), 1)
    if self.cfg.num_shared_experts > 0:
      with jax.named_scope("shared_experts"):
        y_TxD = y_TxD + self.shared(x_TxD)
    return unflatten_tokens(y_TxD, B, L, layout).astype(self.dtype), aux

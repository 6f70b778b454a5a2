"""Dropless top-k Mixture-of-Experts feed-forward layer with SwiGLU experts.

Tokens are flattened (T = B*L), each takes `top_k` experts (A = T*k assignments), the assignments
are laid out by expert once (`plan_dispatch`), three grouped matmuls run on that layout (gate, up,
down), and each token sums its experts' outputs weighted by the renormalised top-k probabilities.
Padding tokens (segment_ids == 0) are routed and computed like any token (static shapes, no
branch), but excluded from every statistic and loss.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from model import grouped_matmul as gmm
from model.config import MoEConfig
from model.router import balance_stats, top_k_routing
from model.sharding import param


class MoE(nnx.Module):
  """x_BxLxD -> (y_BxLxD, aux). aux: load_balance_loss, router_z_loss, expert_load [E],
  expert_load_by_modality [3, E] (when modality is given)."""

  def __init__(self, d_model: int, cfg: MoEConfig, *, dtype="float32", param_dtype="float32",
               rngs: nnx.Rngs):
    E, D, H = cfg.num_experts, d_model, cfg.expert_hidden
    if not 1 <= cfg.top_k <= E:
      raise ValueError(f"moe.top_k={cfg.top_k} must be in 1..num_experts={E}")
    self.cfg = cfg
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

  def __call__(self, x_BxLxD: jax.Array, segment_ids_BxL: jax.Array,
               modality_BxL: jax.Array | None = None) -> tuple[jax.Array, dict]:
    cfg = self.cfg
    B, L, D = x_BxLxD.shape
    T, K, E = B * L, cfg.top_k, cfg.num_experts
    x_TxD = x_BxLxD.reshape(T, D).astype(self.dtype)
    valid_T = segment_ids_BxL.reshape(T) > 0

    with jax.named_scope("router"):
      logits_TxE = x_TxD.astype(jnp.float32) @ self.router_DxE[...]
      probs_TxE, expert_TxK, weight_TxK = top_k_routing(logits_TxE, K)
      aux = balance_stats(logits_TxE, probs_TxE, expert_TxK, valid_T,
                          None if modality_BxL is None else modality_BxL.reshape(T))
    with jax.named_scope("dispatch"):
      plan = gmm.plan_dispatch(expert_TxK, E, backend=cfg.backend, block_rows=cfg.block_rows)
      x_RxD = gmm.dispatch(plan, x_TxD)
    with jax.named_scope("experts"):
      gate_RxH = plan.matmul(x_RxD, self.w_gate_ExDxH[...])
      up_RxH = plan.matmul(x_RxD, self.w_up_ExDxH[...])
      y_RxD = plan.matmul(jax.nn.silu(gate_RxH) * up_RxH, self.w_down_ExHxD[...])
    with jax.named_scope("combine"):
      y_TxD = gmm.combine(plan, y_RxD, weight_TxK)
    return y_TxD.reshape(B, L, D).astype(self.dtype), aux

"""Typed configuration of the decoder and its MoE feed-forward.

Every field is a config key under `model.` (e.g. `model.moe.top_k=2`). The vocabulary size and the
feature width are not keys: they come from the dataset (see `data.vocab`).
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  num_experts: int = 8            # routed experts per MoE layer
  top_k: int = 2                  # experts each token takes (router "topk")
  expert_hidden: int = 256        # hidden width of one expert's SwiGLU
  backend: str = "auto"           # grouped matmul: auto | blocked | ragged_dot | tokamax |
                                  # megablox | dense (model/grouped_matmul.py)
  block_rows: int = 256           # most rows per block of the "blocked" grouped matmul (blocks
                                  # shrink to 32 when many experts share few tokens)
  load_balance_coef: float = 1e-2 # Switch/GShard load-balancing loss coefficient
  z_loss_coef: float = 1e-3       # router z-loss coefficient
  router: str = "topk"            # topk: top_k experts per token | dynamic: experts by descending
                                  # probability until their mass reaches a per-layer threshold
  target_active_fraction: float = 0.125  # dynamic: the controller holds mean(experts taken)/E here
  k_min: int = 1                  # dynamic: fewest experts a token takes
  k_max: int = 4                  # dynamic: most experts a token takes (static buffer T*k_max rows)
  threshold_init: float = 0.5     # dynamic: starting probability-mass threshold of every layer
  threshold_rate: float = 0.05    # dynamic: controller step, threshold *= exp(rate*(target-f)/target)
  bias_update_rate: float = 0.0   # auxiliary-loss-free balance (DeepSeek-V3): step of the per-layer,
                                  # per-modality expert bias that ranks experts (~1e-3); 0 = off
  dispatch: str = "auto"          # how experts run on a mesh: auto | local | all_gather (dropless)
                                  # | all_to_all (fixed capacity, drops) | ragged_all_to_all (GPU/TPU,
                                  # dropless, exact sizes); see model/expert_parallel.py
  capacity_factor: float = 1.25   # all_to_all: rows per device pair = factor * fair share
  num_groups: int = 1             # expert groups (consecutive experts); set it to the expert axis
                                  # size so that a group is one device's experts
  max_groups: int = 0             # a token's experts come from at most this many groups, chosen by
                                  # group score (DeepSeek-V3 node-limited routing); 0 = no limit
  num_shared_experts: int = 0     # experts every token always uses (one SwiGLU of width
                                  # num_shared_experts * expert_hidden), added to the routed ones


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  num_layers: int = 4             # decoder blocks
  d_model: int = 128              # residual width
  num_heads: int = 4              # query heads
  num_kv_heads: int = 2           # key/value heads (GQA); divides num_heads
  head_dim: int = 32              # width of one head
  rope_theta: float = 10000.0     # RoPE base
  rope_sections: tuple[int, int, int] = (8, 4, 4)  # rotary pairs for (t, h, w); sums to head_dim/2
  qk_norm: bool = True            # RMSNorm on queries and keys
  attention: str = "auto"         # auto | blockwise | xla | cudnn
  attention_block: int = 128      # key/query block of the blockwise attention
  dtype: str = "float32"          # compute dtype: float32 | bfloat16
  param_dtype: str = "float32"    # parameter dtype
  num_dense_layers: int = 0       # the first N blocks use a dense SwiGLU instead of the MoE layer
  dense_hidden: int = 512         # hidden width of those dense blocks' SwiGLU
  moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)

  @property
  def num_moe_layers(self) -> int:
    """Blocks with an MoE feed-forward (the last num_layers - num_dense_layers)."""
    return self.num_layers - self.num_dense_layers

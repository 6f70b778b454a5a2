"""Typed configuration of the decoder and its MoE feed-forward.

Every field is a config key under `model.` (e.g. `model.moe.top_k=2`). The vocabulary size and the
feature width are not keys: they come from the dataset (see `data.vocab`).

`check(cfg)` holds every condition on these values, each once: it raises a one-line ValueError
naming the key (`config key 'model.moe.top_k' must be ...`). train/config.py's `validate()` calls it
and reports a ConfigError; a layer calls the part it relies on (`check_moe`, `check_heads`,
`check_rope`, `check_dense_layers`). The names a key picks from (`model.moe.backend`, `.router`,
`.dispatch`, `model.attention`) are listed beside the code that runs them and checked with `one_of`.
"""
import dataclasses

from omnimoe.model.blockwise_attention import NO_WINDOW


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
  lone_expert: str = "probability"  # a token that takes one expert (top_k 1, or the dynamic
                                  # router's simplest tokens) is weighted by its router probability
                                  # (Switch) so the loss trains the router | one: weight 1, as
                                  # renormalised top-k gives (Qwen3-MoE at top_k 1)
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
  local_layers: tuple[int, ...] = ()  # indices of sliding-window (local) attention layers; the
                                  # others attend to the whole causal past (global)
  attention_window: int = 0       # a local layer's query sees the keys less than this many
                                  # positions back (itself included); set iff local_layers is
  dtype: str = "float32"          # compute dtype: float32 | bfloat16
  param_dtype: str = "float32"    # parameters and AdamW state: float32 only (master weights;
                                  # model.dtype is the compute dtype)
  num_dense_layers: int = 0       # the first N blocks use a dense SwiGLU instead of the MoE layer
  dense_hidden: int = 512         # hidden width of those dense blocks' SwiGLU
  remat: str = "none"             # recompute each block in the backward pass: none | full (keep only
                                  # block inputs) | dots (also keep matmul outputs without batch
                                  # dims, i.e. the projections); see model/decoder.py
  scan_layers: bool = False       # MoE blocks' parameters stacked on a leading `layers` axis and run
                                  # by one lax.scan (compile time no longer grows with num_layers);
                                  # dense first blocks stay unrolled in front; see model/decoder.py
  context_parallel: str = "all_gather"  # attention over a `context` mesh axis: all_gather (every
                                  # device gathers the row's keys/values) | ring (K/V blocks passed
                                  # around with ppermute; memory per device ~ L / context); see
                                  # model/context_parallel.py
  moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)

  @property
  def num_moe_layers(self) -> int:
    """Blocks with an MoE feed-forward (the last num_layers - num_dense_layers)."""
    return self.num_layers - self.num_dense_layers


DTYPES = ("float32", "bfloat16")   # model.dtype (parameters are always float32)
REMAT = ("none", "full", "dots")   # model.remat (the jax checkpoint policies: model/decoder.py)
CONTEXT_PARALLEL = ("all_gather", "ring")   # model.context_parallel (model/context_parallel.py)


def need(ok: bool, key: str, what: str) -> None:
  """Raises ValueError("config key 'KEY' WHAT") unless `ok`."""
  if not ok:
    raise ValueError(f"config key '{key}' {what}")


def positive(key: str, value) -> None:
  need(value > 0, key, f"must be positive, got {value}")


def one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
  """`value` must be one of `choices`; the message names the key and lists the choices."""
  listed = " or ".join(choices) if len(choices) == 2 else "one of " + ", ".join(choices)
  need(value in choices, key, f"must be {listed}; got '{value}'")


def check(cfg: ModelConfig) -> None:
  """Every number the decoder cannot be built with (see the module docstring)."""
  for name in ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "dense_hidden",
               "attention_block"):
    positive(f"model.{name}", getattr(cfg, name))
  check_heads(cfg.num_heads, cfg.num_kv_heads)
  check_rope(cfg.head_dim, cfg.rope_sections)
  check_dense_layers(cfg.num_dense_layers, cfg.num_layers)
  check_windows(cfg)
  one_of("model.remat", cfg.remat, REMAT)
  one_of("model.context_parallel", cfg.context_parallel, CONTEXT_PARALLEL)
  check_moe(cfg.moe)


def check_windows(cfg: ModelConfig) -> None:
  bad = [i for i in cfg.local_layers if not 0 <= i < cfg.num_layers]
  need(not bad, "model.local_layers",
       f"layer indices must lie in 0..{cfg.num_layers - 1} (model.num_layers); got {bad}")
  need(len(set(cfg.local_layers)) == len(cfg.local_layers), "model.local_layers",
       f"has a layer twice: {list(cfg.local_layers)}")
  if cfg.local_layers:
    positive("model.attention_window", cfg.attention_window)
  else:
    need(cfg.attention_window == 0, "model.attention_window",
         f"is {cfg.attention_window} but model.local_layers is empty; name the local layers")


def layer_windows(cfg: ModelConfig) -> list[int]:
  """Each layer's attention window: model.attention_window for the local layers, else NO_WINDOW."""
  return [cfg.attention_window if i in cfg.local_layers else NO_WINDOW
          for i in range(cfg.num_layers)]


def check_heads(num_heads: int, num_kv_heads: int) -> None:
  need(num_heads % num_kv_heads == 0, "model.num_kv_heads",
       f"must divide model.num_heads={num_heads}, got {num_kv_heads}")


def check_rope(head_dim: int, sections) -> None:
  need(head_dim % 2 == 0, "model.head_dim", f"must be even, got {head_dim}")
  need(sum(sections) == head_dim // 2, "model.rope_sections",
       f"must sum to model.head_dim/2={head_dim // 2}, got {list(sections)}")


def check_dense_layers(num_dense_layers: int, num_layers: int) -> None:
  need(0 <= num_dense_layers < num_layers, "model.num_dense_layers",
       f"must lie in 0..model.num_layers-1={num_layers - 1}, got {num_dense_layers}")


def check_moe(moe: MoEConfig) -> None:
  """The MoE layer's numbers and its router controller's; `moe.router` must be a known router."""
  check_moe_layer(moe)
  if moe.router == "dynamic":
    E, f = moe.num_experts, moe.target_active_fraction
    need(0 < f <= 1, "model.moe.target_active_fraction", f"must lie in (0, 1], got {f}")
    need(moe.k_min / E <= f <= moe.k_max / E, "model.moe.target_active_fraction",
         f"must lie in [k_min/num_experts, k_max/num_experts] = [{moe.k_min / E:.4g}, "
         f"{moe.k_max / E:.4g}], got {f}")
  need(0 < moe.threshold_init <= 1, "model.moe.threshold_init",
       f"must lie in (0, 1], got {moe.threshold_init}")
  for name in ("bias_update_rate", "threshold_rate"):
    need(getattr(moe, name) >= 0, f"model.moe.{name}", f"must be >= 0, got {getattr(moe, name)}")


def check_moe_layer(moe: MoEConfig) -> None:
  """What the MoE layer itself is built from (model/moe.py calls this; `check_moe` adds the
  trainer's controller settings)."""
  E = moe.num_experts
  for name in ("num_experts", "top_k", "expert_hidden", "block_rows", "capacity_factor"):
    positive(f"model.moe.{name}", getattr(moe, name))
  need(moe.top_k <= E, "model.moe.top_k",
       f"must be at most model.moe.num_experts={E}, got {moe.top_k}")
  need(moe.num_shared_experts >= 0, "model.moe.num_shared_experts",
       f"must be >= 0, got {moe.num_shared_experts}")
  if moe.router == "dynamic":
    need(1 <= moe.k_min <= moe.k_max, "model.moe.k_min",
         f"must lie in 1..model.moe.k_max={moe.k_max}, got {moe.k_min}")
    need(moe.k_max <= E, "model.moe.k_max",
         f"must be at most model.moe.num_experts={E}, got {moe.k_max}")
  _check_groups(moe)


def _check_groups(moe: MoEConfig) -> None:
  """Expert groups, and node-limited routing that must leave a token's experts in reach."""
  E, G = moe.num_experts, moe.num_groups
  need(G >= 1 and E % G == 0, "model.moe.num_groups",
       f"must divide model.moe.num_experts={E}, got {G}")
  need(0 <= moe.max_groups <= G, "model.moe.max_groups",
       f"must lie in 0..model.moe.num_groups={G} (0 = no limit), got {moe.max_groups}")
  reach = (moe.max_groups or G) * (E // G)
  k = moe.top_k if moe.router == "topk" else moe.k_max
  need(k <= reach, "model.moe.max_groups",
       f"must leave the {k} experts a token may take in reach, but {moe.max_groups} of "
       f"{G} groups hold {reach}")

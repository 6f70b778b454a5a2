"""Routers (float32): fixed top-k and dynamic (probability mass up to a threshold), the threshold
controller of the dynamic router, and the balance statistics.

Both routers return a static [T, k] layout (k = top_k, or k_max for the dynamic router) and a mask
of the slots in use; unused slots have weight 0 and take no row in the grouped matmul. Routing is
causal: every decision looks at one token's own logits only.

Statistics use valid tokens only (segment_ids > 0), over every token of the array passed in; under
jit with a data-sharded batch that is the global batch (XLA inserts the cross-device sums).
"""
import jax
import jax.numpy as jnp

from omnimoe.model.modality import CODES, NAMES as MODALITIES


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """jax.lax.top_k's values and indices (ties: the lower index first) from a stable sort along the
  last axis. GSPMD partitions a sort along its other axes, while XLA's TopK call gathers a sharded
  token axis whole onto every device (a [T, E] all-gather per layer, found by `omnimoe plan`)."""
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  _, index = jax.lax.sort((-jax.lax.stop_gradient(x), iota), dimension=x.ndim - 1, num_keys=1,
                          is_stable=True)
  index = index[..., :k]
  return jnp.take_along_axis(x, index, axis=-1), index


def group_limit(scores_TxE: jax.Array, num_groups: int, max_groups: int) -> jax.Array:
  """Experts in reach [T, E] bool: those of the `max_groups` best of `num_groups` groups of
  consecutive experts, a group scored by the sum of its two highest scores (DeepSeek-V3's
  node-limited routing; one score when a group holds one expert). Per token, so causal."""
  T, E = scores_TxE.shape
  per_group = E // num_groups
  top_TxGxJ, _ = top_k(scores_TxE.reshape(T, num_groups, per_group), min(2, per_group))
  _, best_TxM = top_k(jnp.sum(top_TxGxJ, axis=-1), max_groups)
  chosen_TxG = jnp.any(best_TxM[:, :, None] == jnp.arange(num_groups), axis=1)
  return jnp.repeat(chosen_TxG, per_group, axis=1)


def _ranked(probs_TxE: jax.Array, k: int, bias_TxE: jax.Array | None, groups: tuple[int, int]):
  """The k experts of highest probability (+ bias, which only ranks: DeepSeek-V3's auxiliary-loss-
  free balance) among those in reach (`groups` = (num_groups, max_groups); max_groups 0 = all),
  their probabilities in rank order, and the probability mass in reach [T, 1]."""
  scores_TxE = probs_TxE if bias_TxE is None else probs_TxE + jax.lax.stop_gradient(bias_TxE)
  num_groups, max_groups = groups
  reach_Tx1 = jnp.ones((probs_TxE.shape[0], 1), probs_TxE.dtype)
  if max_groups and max_groups < num_groups:
    allowed_TxE = group_limit(jax.lax.stop_gradient(scores_TxE), num_groups, max_groups)
    scores_TxE = jnp.where(allowed_TxE, scores_TxE, -jnp.inf)
    reach_Tx1 = jnp.sum(jnp.where(allowed_TxE, probs_TxE, 0.0), axis=-1, keepdims=True)
  if bias_TxE is None and not max_groups:
    top_p_TxK, expert_TxK = top_k(probs_TxE, k)
  else:
    _, expert_TxK = top_k(scores_TxE, k)
    top_p_TxK = jnp.take_along_axis(probs_TxE, expert_TxK, axis=-1)
  return top_p_TxK, expert_TxK.astype(jnp.int32), reach_Tx1


LONE_EXPERT = ("probability", "one")


def combine_weights(kept_TxK: jax.Array, used_TxK: jax.Array, lone_expert: str) -> jax.Array:
  """The weights a token's experts get: their probabilities renormalised to sum 1 (Qwen3-MoE's
  top-k), except for a token that takes one expert. Renormalised, that expert's weight is exactly 1
  whatever the router says, so no gradient of the language-model loss reaches the router;
  `lone_expert="probability"` weights it by its router probability instead (Switch Transformer),
  and "one" keeps the constant 1. `kept_TxK` is 0 off `used_TxK`."""
  renormalised_TxK = kept_TxK / jnp.sum(kept_TxK, axis=-1, keepdims=True)
  if lone_expert == "one":
    return renormalised_TxK
  alone_Tx1 = jnp.sum(used_TxK, axis=-1, keepdims=True) == 1
  return jnp.where(alone_Tx1, kept_TxK, renormalised_TxK)


def top_k_routing(logits_TxE: jax.Array, k: int, bias_TxE: jax.Array | None = None,
                  groups: tuple[int, int] = (1, 0), lone_expert: str = "probability"
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Softmax over experts, top-k (ranked by probability + bias), weights = the chosen experts'
  probabilities renormalised to sum 1 (at k = 1: see `combine_weights`).

  Returns (probs_TxE, expert_TxK, weight_TxK)."""
  probs_TxE = jax.nn.softmax(logits_TxE.astype(jnp.float32), axis=-1)
  top_p_TxK, expert_TxK, _ = _ranked(probs_TxE, k, bias_TxE, groups)
  weight_TxK = combine_weights(top_p_TxK, jnp.ones(top_p_TxK.shape, bool), lone_expert)
  return probs_TxE, expert_TxK, weight_TxK


def dynamic_routing(logits_TxE: jax.Array, threshold: jax.Array, k_min: int, k_max: int,
                    bias_TxE: jax.Array | None = None, groups: tuple[int, int] = (1, 0),
                    lone_expert: str = "probability"
                    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Each token takes experts by descending probability until their mass reaches `threshold`,
  at least k_min and at most k_max of them; weights renormalised over the experts taken (a token
  that takes one expert: see `combine_weights`).

  Slot j (0-based, descending probability) is taken when j < k_min or the mass of slots 0..j-1 is
  below the threshold, so the mass taken is >= threshold unless k_max binds. With `bias_TxE` the
  experts are ranked by probability + bias (the mass still counts probabilities). With
  `groups` = (num_groups, max_groups) only the experts of the best groups are in reach, and the
  mass is measured as a share of the probability in reach.
  Returns (probs_TxE, expert_TxK, weight_TxK, used_TxK) with K = k_max; weight is 0 off `used`."""
  probs_TxE = jax.nn.softmax(logits_TxE.astype(jnp.float32), axis=-1)
  top_p_TxK, expert_TxK, reach_Tx1 = _ranked(probs_TxE, k_max, bias_TxE, groups)
  mass_before_TxK = (jnp.cumsum(top_p_TxK, axis=-1) - top_p_TxK) / reach_Tx1
  used_TxK = (jnp.arange(k_max) < k_min) | (jax.lax.stop_gradient(mass_before_TxK) < threshold)
  kept_TxK = jnp.where(used_TxK, top_p_TxK, 0.0)
  weight_TxK = combine_weights(kept_TxK, used_TxK, lone_expert)
  return probs_TxE, expert_TxK, weight_TxK, used_TxK


def update_threshold(threshold: jax.Array, active_fraction: jax.Array, target: float,
                     rate: float) -> jax.Array:
  """One step of the dynamic router's controller (multiplicative, per layer, float32).

  threshold <- threshold * exp(rate * (target - measured) / target), clipped to [1e-4, 1]: more
  experts active than the target lowers the mass each token must reach, fewer raises it."""
  step = rate * (target - active_fraction) / target
  return jnp.clip(threshold * jnp.exp(step), 1e-4, 1.0).astype(jnp.float32)


def update_bias(bias_LxMxE: jax.Array, load_LxMxE: jax.Array, rate: float) -> jax.Array:
  """DeepSeek-V3 auxiliary-loss-free balance, per layer and modality: b_i += rate where expert i
  took less than its share 1/E of the modality's assignments, -= rate where more. A modality with
  no tokens in the step keeps its bias."""
  E = load_LxMxE.shape[-1]
  present_LxMx1 = jnp.sum(load_LxMxE, axis=-1, keepdims=True) > 0
  step = rate * jnp.sign(1.0 / E - load_LxMxE)
  return (bias_LxMxE + jnp.where(present_LxMx1, step, 0.0)).astype(jnp.float32)


def init_router_state(num_layers: int, cfg) -> dict:
  """The router controller state at step 0, per MoE layer (float32): {"threshold": [L]} and, with
  `cfg.bias_update_rate > 0`, {"bias": [L, M, E]} (per modality: text, image, audio, video).

  It is an input of the model and part of the train state (so of every checkpoint); the train
  step advances it with `update_router_state` from the aux the model returned."""
  state = {"threshold": jnp.full((num_layers,), cfg.threshold_init, jnp.float32)}
  if cfg.bias_update_rate > 0:
    state["bias"] = jnp.zeros((num_layers, len(MODALITIES), cfg.num_experts), jnp.float32)
  return state


def update_router_state(state: dict, aux: dict, cfg) -> dict:
  """The next controller state from one step's aux: the thresholds (router "dynamic") from the
  per-layer `active_fraction` [L], the biases (if kept) from `expert_load_by_modality` [L, modalities, E]."""
  new = dict(state)
  if cfg.router == "dynamic":
    new["threshold"] = update_threshold(state["threshold"], aux["active_fraction"],
                                        cfg.target_active_fraction, cfg.threshold_rate)
  if "bias" in state:
    new["bias"] = update_bias(state["bias"], aux["expert_load_by_modality"], cfg.bias_update_rate)
  return new


def balance_stats(logits_TxE: jax.Array, probs_TxE: jax.Array, expert_TxK: jax.Array,
                  valid_T: jax.Array, modality_T: jax.Array | None = None,
                  used_TxK: jax.Array | None = None) -> dict:
  """Switch load-balancing loss E * sum_i f_i P_i, router z-loss, expert loads, active fractions
  (float32).

  f_i: share of the valid tokens' assignments (slots in `used_TxK`, all by default) that go to
  expert i (`expert_load`, sums to 1); P_i: mean router probability of expert i over valid tokens;
  z-loss: mean logsumexp(logits)^2; `active_fraction`: mean over valid tokens of (experts taken) / E;
  `router_entropy`: mean entropy (nats) of the router's distribution over experts.
  With modality (M modalities of model/modality.py: text, image, audio, video):
  `expert_load_by_modality` [M, E], the same share within each modality's tokens (0 if none),
  `active_fraction_by_modality` [M] and `router_entropy_by_modality` [M] (0 if none), and `coactivation_by_modality` [M, E, E]: [m, i, j] counts the valid tokens of modality m that
  took both expert i and expert j (the diagonal: those that took i), sums that add up over batches.
  """
  T, E = probs_TxE.shape
  v_T = valid_T.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(v_T), 1.0)
  used_TxK = jnp.ones(expert_TxK.shape, bool) if used_TxK is None else used_TxK
  onehot_TxE = jnp.einsum("tk,tke->te", used_TxK.astype(jnp.float32),
                          jax.nn.one_hot(expert_TxK, E, dtype=jnp.float32))  # per token
  counts_E = jnp.sum(onehot_TxE * v_T[:, None], axis=0)
  load_E = counts_E / jnp.maximum(jnp.sum(counts_E), 1.0)
  active_T = jnp.sum(onehot_TxE, axis=-1) / E
  entropy_T = -jnp.sum(probs_TxE * jnp.log(jnp.maximum(probs_TxE, 1e-30)), axis=-1)
  mean_prob_E = jnp.sum(probs_TxE * v_T[:, None], axis=0) / n
  lse_T = jax.nn.logsumexp(logits_TxE.astype(jnp.float32), axis=-1)
  aux = {
      "load_balance_loss": E * jnp.sum(jax.lax.stop_gradient(load_E) * mean_prob_E),
      "router_z_loss": jnp.sum(v_T * lse_T ** 2) / n,
      "expert_load": load_E,
      "active_fraction": jnp.sum(active_T * v_T) / n,
      "router_entropy": jax.lax.stop_gradient(jnp.sum(entropy_T * v_T) / n),
  }
  if modality_T is not None:
    m_TxM = (modality_T[:, None] == jnp.asarray(CODES)).astype(jnp.float32)
    mv_TxM = m_TxM * v_T[:, None]
    counts_MxE = jnp.einsum("tm,te->me", mv_TxM, onehot_TxE)
    aux["expert_load_by_modality"] = counts_MxE / jnp.maximum(
        counts_MxE.sum(axis=-1, keepdims=True), 1.0)
    n_M = jnp.maximum(mv_TxM.sum(axis=0), 1.0)
    aux["active_fraction_by_modality"] = jnp.einsum("tm,t->m", mv_TxM, active_T) / n_M
    aux["router_entropy_by_modality"] = jax.lax.stop_gradient(
        jnp.einsum("tm,t->m", mv_TxM, entropy_T) / n_M)
    taken_TxE = jax.lax.stop_gradient(onehot_TxE)
    aux["coactivation_by_modality"] = jnp.einsum(
        "tm,te,tf->mef", mv_TxM, taken_TxE, taken_TxE, preferred_element_type=jnp.float32)
  return aux

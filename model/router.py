"""Top-k router (float32) and its balance statistics.

Statistics use valid tokens only (segment_ids > 0), over every token of the array passed in; under
jit with a data-sharded batch that is the global batch (XLA inserts the cross-device sums).
"""
import jax
import jax.numpy as jnp

MODALITIES = ("text", "image", "audio")   # modality ids 1, 2, 3 of the batch contract


def top_k_routing(logits_TxE: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Softmax over experts, top-k, weights renormalised to sum 1.

  Returns (probs_TxE, expert_TxK, weight_TxK)."""
  probs_TxE = jax.nn.softmax(logits_TxE.astype(jnp.float32), axis=-1)
  top_p_TxK, expert_TxK = jax.lax.top_k(probs_TxE, k)
  weight_TxK = top_p_TxK / jnp.sum(top_p_TxK, axis=-1, keepdims=True)
  return probs_TxE, expert_TxK.astype(jnp.int32), weight_TxK


def balance_stats(logits_TxE: jax.Array, probs_TxE: jax.Array, expert_TxK: jax.Array,
                  valid_T: jax.Array, modality_T: jax.Array | None = None) -> dict:
  """Switch load-balancing loss E * sum_i f_i P_i, router z-loss, expert loads (float32).

  f_i: share of the valid tokens' assignments that go to expert i (`expert_load`, sums to 1);
  P_i: mean router probability of expert i over valid tokens; z-loss: mean logsumexp(logits)^2.
  `expert_load_by_modality` [3, E]: the same share within text / image / audio tokens (0 if none).
  """
  T, E = probs_TxE.shape
  K = expert_TxK.shape[1]
  v_T = valid_T.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(v_T), 1.0)
  onehot_TxE = jnp.sum(jax.nn.one_hot(expert_TxK, E, dtype=jnp.float32), axis=1)  # per token
  counts_E = jnp.sum(onehot_TxE * v_T[:, None], axis=0)
  load_E = counts_E / (n * K)
  mean_prob_E = jnp.sum(probs_TxE * v_T[:, None], axis=0) / n
  lse_T = jax.nn.logsumexp(logits_TxE.astype(jnp.float32), axis=-1)
  aux = {
      "load_balance_loss": E * jnp.sum(jax.lax.stop_gradient(load_E) * mean_prob_E),
      "router_z_loss": jnp.sum(v_T * lse_T ** 2) / n,
      "expert_load": load_E,
  }
  if modality_T is not None:
    m_TxM = (modality_T[:, None] == jnp.arange(1, len(MODALITIES) + 1)).astype(jnp.float32)
    counts_MxE = jnp.einsum("tm,te->me", m_TxM * v_T[:, None], onehot_TxE)
    aux["expert_load_by_modality"] = counts_MxE / jnp.maximum(
        counts_MxE.sum(axis=-1, keepdims=True), 1.0)
  return aux

"""How the next token is chosen from a row's logits: greedy, or sampled at a temperature from the
top-k and/or top-p (nucleus) of the distribution, over the ids `allowed` (train/media_spans.py).

`Sampler(temperature, top_k, top_p)`: temperature 0 = greedy (argmax; the lower id on a tie);
top_k 0 and top_p 1 = no cut. The cuts apply in that order to the tempered, constrained
distribution: top-k keeps the k most probable ids (ties at the k-th value all stay), top-p then
keeps the fewest most probable ids whose mass reaches p (at least one). Sampling draws with
jax.random.categorical from the key given, so one seed gives the same tokens, bit for bit.
`log_prob` is a token's log-probability under the model's constrained distribution at
temperature 1 (what `--samples N` ranks by), whatever the sampler did.
"""
import dataclasses

import jax
import jax.numpy as jnp

NEG = -1e30   # logit of an id that may not come (finite: a row with one allowed id stays finite)


@dataclasses.dataclass(frozen=True)
class Sampler:
  temperature: float = 0.0    # 0 = greedy
  top_k: int = 0              # 0 = no top-k cut
  top_p: float = 1.0          # 1 = no nucleus cut

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def constrain_logits(logits_BxV: jax.Array, allowed_BxV: jax.Array) -> jax.Array:
  return jnp.where(allowed_BxV, logits_BxV.astype(jnp.float32), NEG)


def cut_logits(s: Sampler, logits_BxV: jax.Array) -> jax.Array:
  """The tempered logits with the ids the top-k and top-p cuts remove at NEG."""
  x = logits_BxV / s.temperature
  if s.top_k:
    kth_Bx1 = jax.lax.top_k(x, s.top_k)[0][:, -1:]
    x = jnp.where(x >= kth_Bx1, x, NEG)
  if s.top_p < 1:
    sorted_BxV = -jnp.sort(-x, axis=-1)                       # descending
    p_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(p_BxV, axis=-1) - p_BxV           # mass of the more probable ids
    kept_BxV = (before_BxV < s.top_p) & (sorted_BxV > NEG / 2)
    last_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x >= last_Bx1, x, NEG)
  return x


def choose(s: Sampler, key: jax.Array, logits_BxV: jax.Array) -> jax.Array:
  """int32 [B]: the next token of each row (logits already constrained)."""
  if s.temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, cut_logits(s, logits_BxV), axis=-1).astype(jnp.int32)


def log_prob(logits_BxV: jax.Array, token_B: jax.Array) -> jax.Array:
  """float32 [B]: log-probability of each token under the (constrained) logits."""
  logp_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
  return jnp.take_along_axis(logp_BxV, token_B[:, None], axis=-1)[:, 0]

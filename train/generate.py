"""Generation with the KV cache: prefill a batch of prompts once, then one position per step.

`make_generate(setup, spans, prompt_len=P, max_new_tokens=N, sampler=..., free=...)` returns a
jitted `generate(params, prompt, next_position_B, key, router=None, force_B=None, features_VxF=None)`
-> `Generated`. The prompt is the batch contract for the P prompt positions of B rows (each row's
prompt ends at position P - 1). Each step constrains the last logits to the ids a row may write
(train/media_spans.py: text, EOS, whole media spans), chooses a token (train/sampling.py; the key
is `fold_in(key, step)`), and feeds it back at its (t, h, w) position with modality, segment id 1
(0 once the row has written EOS) and features `features_VxF[token]` (the codebook centroid of a
media code; zeros for text): a generated image code enters the model as the centroid patch, the
way a real patch enters as itself. The cache holds P + N slots (model/kv_cache.py).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from omnimoe.model import kv_cache
from omnimoe.train import media_spans, sampling
from omnimoe.train.sampling import Sampler
from omnimoe.train.state import Setup, merge


class Generated(NamedTuple):
  tokens: jax.Array          # int32 [B, N]; PAD after a row's EOS
  log_probs: jax.Array       # float32 [B, N]: each token's log-probability (0 where not live)
  live: jax.Array            # bool [B, N]: the token belongs to the document (up to its EOS)
  positions: jax.Array       # int32 [B, N, 3]
  logits: jax.Array | None   # float32 [B, N, V]: the logits each token was chosen from (unconstrained),
                             # only with keep_logits


def feature_table(spans: media_spans.Spans, codebooks: dict, feature_dim: int):
  """float32 [V, F]: row id = the centroid of a media code (zero-padded to F), zeros elsewhere."""
  import numpy as np
  table = np.zeros((spans.size, feature_dim), np.float32)
  for name, lo, hi in zip(spans.names, spans.lo, spans.hi):
    if name in codebooks:
      book = np.asarray(codebooks[name], np.float32)
      table[lo:lo + len(book), :book.shape[1]] = book[:hi - lo]
  return table


def make_generate(setup: Setup, spans: media_spans.Spans, *, prompt_len: int, max_new_tokens: int,
                  sampler: Sampler = Sampler(), free: tuple[str, ...] = (),
                  keep_logits: bool = False, out_shardings=None):
  """See the module docstring; `free`: the media a row in text may open on its own."""
  P, N = prompt_len, max_new_tokens

  def generate(params, prompt, next_position_B, key, router=None, force_B=None,
               features_VxF=None):
    model = merge(setup, params)
    B = prompt["tokens"].shape[0]
    F = prompt["features"].shape[-1]
    table = jnp.zeros((spans.size, F), jnp.float32) if features_VxF is None else features_VxF
    cache = kv_cache.init_cache(model.cfg, B, P + N)
    prompt = {k: prompt[k] for k in ("tokens", "features", "modality", "segment_ids", "positions")}
    logits_BxPxV, _, cache = model.decode(prompt, cache, router)
    state = media_spans.initial_state(next_position_B, force_B)

    def step(carry, j):
      logits_BxV, cache, state = carry
      masked_BxV = sampling.constrain_logits(logits_BxV, media_spans.allowed(spans, state, free))
      token_B = sampling.choose(sampler, jax.random.fold_in(key, j), masked_BxV)
      logp_B = sampling.log_prob(masked_BxV, token_B)
      state, position_Bx3, live_B = media_spans.advance(spans, state, token_B)
      fed = {"tokens": token_B[:, None],
             "features": jnp.take(table, token_B, axis=0)[:, None].astype(prompt["features"].dtype),
             "modality": media_spans.modality_of(spans, token_B)[:, None],
             "segment_ids": live_B.astype(jnp.int32)[:, None],
             "positions": position_Bx3[:, None]}
      next_BxLxV, _, cache = model.decode(fed, cache, router)
      out = (token_B, jnp.where(live_B, logp_B, 0.0), live_B, position_Bx3)
      return (next_BxLxV[:, 0], cache, state), out + ((logits_BxV,) if keep_logits else ())

    _, outs = jax.lax.scan(step, (logits_BxPxV[:, P - 1], cache, state), jnp.arange(N))
    outs = [jnp.moveaxis(o, 0, 1) for o in outs]
    return Generated(*outs[:4], outs[4] if keep_logits else None)

  return jax.jit(generate, out_shardings=out_shardings)

"""The pure train and eval steps: `(state, batch) -> (state, metrics)`, jitted once each.

With `train.microbatches=M > 1` the train step accumulates gradients: microbatch m holds rows m,
m + M, m + 2M, ... of the global batch (so each stays spread over the data-parallel devices), a
`lax.scan` runs them one after another and sums their gradients, then the optimizer steps once.
Each microbatch's cross entropy is divided by the weight of the whole global batch, so the summed
cross entropy and its gradient are the one-shot step's; the MoE balance and z losses and the
statistics the router controller reads are each microbatch's own, averaged (balance over fewer
tokens is a different, noisier statistic than over the global batch).

With `train.loss_chunk=C` both steps take the cross entropy C positions at a time
(`chunked_cross_entropy_BxL`): the logits of one [B, C] chunk are made, reduced to per-token losses
and dropped, and remade in the backward pass, so no [B, L, V] array exists."""
import jax
import jax.numpy as jnp
import optax

from omnimoe.model.decoder import Decoder, head_logits
from omnimoe.model.modality import MODALITIES
from omnimoe.model.router import update_router_state
from omnimoe.train.config import Config
from omnimoe.train.state import Setup, ema_update, learning_rate_schedule, merge


def cross_entropy_BxL(logits_BxLxV, targets_BxL):
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV.astype(jnp.float32), targets_BxL)


def chunked_cross_entropy_BxL(h_BxLxD, head_DxV, targets_BxL, chunk: int):
  """cross_entropy_BxL(head_logits(h, head), targets), `chunk` positions at a time (the length is
  padded up to a multiple of `chunk`; the padding's losses are cut off)."""
  B, L, D = h_BxLxD.shape
  N = -(-L // chunk)
  pad = N * chunk - L
  h_NxBxCxD = jnp.pad(h_BxLxD, ((0, 0), (0, pad), (0, 0))).reshape(B, N, chunk, D).swapaxes(0, 1)
  t_NxBxC = jnp.pad(targets_BxL, ((0, 0), (0, pad))).reshape(B, N, chunk).swapaxes(0, 1)

  @jax.checkpoint   # the backward remakes the chunk's logits instead of keeping them
  def one_chunk(args):
    h_BxCxD, t_BxC = args
    return cross_entropy_BxL(head_logits(h_BxCxD, head_DxV), t_BxC)

  ce_NxBxC = jax.lax.map(one_chunk, (h_NxBxCxD, t_NxBxC))
  return ce_NxBxC.swapaxes(0, 1).reshape(B, N * chunk)[:, :L]


def token_cross_entropy(model: Decoder, batch, router, chunk: int):
  """(per-position cross entropy [B, L], the model's aux); `chunk` = train.loss_chunk."""
  if chunk == 0:
    logits_BxLxV, aux = model(batch, router)
    return cross_entropy_BxL(logits_BxLxV, batch["targets"]), aux
  h_BxLxD, aux = model.hidden(batch, router)
  ce_BxL = model.in_mesh(chunked_cross_entropy_BxL, h_BxLxD, model.head_DxV[...],
                         batch["targets"], chunk)
  return ce_BxL, aux


def loss_fn(params, batch, router=None, *, setup: Setup, cfg: Config, weight_total=None,
            aux_scale: float = 1.0):
  """Weighted next-token cross entropy plus the MoE auxiliary losses.

  `router`: the router controller state (None: its initial value). `weight_total`: the divisor of
  the weighted cross entropy (None: this batch's total weight; a microbatch passes the global
  batch's); `aux_scale` multiplies the auxiliary losses (1 / microbatches). Returns (loss, aux);
  aux holds the losses and the per-layer MoE statistics the controller and the metrics need."""
  ce_BxL, aux = token_cross_entropy(merge(setup, params), batch, router, cfg.train.loss_chunk)
  weights_BxL = batch["loss_weights"]
  ce = jnp.sum(ce_BxL * weights_BxL)
  ce = ce / jnp.maximum(jnp.sum(weights_BxL) if weight_total is None else weight_total, 1e-9)
  moe = cfg.model.moe
  total = ce + aux_scale * (moe.load_balance_coef * aux["load_balance_loss"]
                            + moe.z_loss_coef * aux["router_z_loss"])
  return total, {"ce_loss": ce, "load_balance_loss": aux["load_balance_loss"],
                 "router_z_loss": aux["router_z_loss"], **{k: aux[k] for k in MOE_STATS}}


MOE_STATS = ("expert_load", "expert_load_by_modality", "active_fraction",
             "active_fraction_by_modality", "router_entropy", "router_entropy_by_modality",
             "dropped_fraction", "moe_layers",   # per-layer statistics passed on to the metrics
             "coactivation_by_modality")         # counts: summed over microbatches


def microbatches(batch: dict, M: int) -> dict:
  """[B, ...] arrays -> [M, B / M, ...]: microbatch m holds rows m, m + M, m + 2M, ..."""
  return jax.tree.map(lambda a: a.reshape(a.shape[0] // M, M, *a.shape[1:]).swapaxes(0, 1), batch)


def accumulated_grads(params, batch, router, *, setup: Setup, cfg: Config):
  """((loss, aux), grads) of the global batch, `train.microbatches` rows-slices at a time (module
  docstring): cross entropy and its gradient summed, the rest averaged over the microbatches."""
  M = cfg.train.microbatches
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if M == 1:
    return grad_fn(params, batch, router, setup=setup, cfg=cfg)
  weight_total = jnp.sum(batch["loss_weights"])

  def one(carry, micro):
    (loss, aux), grads = grad_fn(params, micro, router, setup=setup, cfg=cfg,
                                 weight_total=weight_total, aux_scale=1.0 / M)
    return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

  zero = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                      jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda a: a[0],
                                                     microbatches(batch, M)), router,
                                                     setup=setup, cfg=cfg)))
  (loss, aux), grads = zero
  (loss, aux, grads), _ = jax.lax.scan(one, (loss, aux, grads), microbatches(batch, M))
  # Summed: the loss (its cross entropy is the global batch's), ce_loss and the co-activation
  # counts; averaged: the rest (moe_layers, the same int32 indices in every microbatch, comes back
  # exactly).
  aux = {k: v if k in ("ce_loss", "coactivation_by_modality") else v // M
         if v.dtype == jnp.int32 else v / M
         for k, v in aux.items()}
  return (loss, aux), grads


def make_train_step(cfg: Config, setup: Setup, batch_sharding):
  schedule = learning_rate_schedule(cfg)

  def train_step(state, batch):
    (loss, aux), grads = accumulated_grads(state["params"], batch, state.get("router"),
                                           setup=setup, cfg=cfg)
    updates, opt_state = setup.optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                 "rng": jax.random.fold_in(state["rng"], state["step"])}
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state["step"]), **aux,
               "real_tokens": jnp.sum(batch["segment_ids"] > 0)}    # not padding (train/mfu.py)
    if "ema" in state:
      new_state["ema"] = ema_update(state["ema"], params, state["step"], cfg.train.ema_decay)
    if "router" in state:   # the controller sees this step's global-batch statistics
      new_state["router"] = update_router_state(state["router"], aux, cfg.model.moe)
      if cfg.model.moe.router == "dynamic":
        metrics["router_threshold"] = state["router"]["threshold"]
    return new_state, metrics

  # One sharding for every array of the batch (the contract's keys, and `order` when rows were
  # reordered for context parallelism: train/context_batch.py).
  return jax.jit(train_step, in_shardings=(setup.shardings, batch_sharding),
                 out_shardings=(setup.shardings, None), donate_argnums=(0,))


def make_eval_step(cfg: Config, setup: Setup, modality_of):
  """Sums of weighted cross entropy and of weights, split by the modality of the target token.

  `modality_of(ids)` maps vocabulary ids to modality codes (data.vocab); sums, not means, so that
  batches add up exactly. `eval_step(params, batch, router=None)`.
  """
  def eval_step(params, batch, router=None):
    ce_BxL, _ = token_cross_entropy(merge(setup, params), batch, router, cfg.train.loss_chunk)
    ce_BxL = ce_BxL * batch["loss_weights"]
    target_mod_BxL = modality_of(batch["targets"])
    out = {"ce_sum": jnp.sum(ce_BxL), "weight_sum": jnp.sum(batch["loss_weights"])}
    for m in MODALITIES:
      mask = (target_mod_BxL == m.code).astype(jnp.float32)
      out[f"ce_sum/{m.name}"] = jnp.sum(ce_BxL * mask)
      out[f"weight_sum/{m.name}"] = jnp.sum(batch["loss_weights"] * mask)
    return out
  return jax.jit(eval_step)

"""The train state, created already sharded: eval_shape -> shardings -> jitted init.

The state is a plain dict pytree, so optax, orbax and `jax.tree` treat it alike:
  params     nested dict of arrays (the Decoder's nnx.Param values)
  opt_state  optax AdamW state
  step       int32 scalar, optimizer steps taken
  rng        uint32[2] PRNG key for anything stochastic
  router     router controller state, only with `model.moe.router=dynamic` or
             `model.moe.bias_update_rate>0`: {"threshold": float32[M], "bias": float32[M, 3, E]}
             per MoE layer (see model.router.init_router_state); an input of the model, advanced
             by the train step, saved in checkpoints
"""
import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from omnimoe.model.decoder import Decoder
from omnimoe.model.expert_parallel import Platform
from omnimoe.model.router import init_router_state
from omnimoe.model.sharding import param_shardings
from omnimoe.train.config import Config


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything static about a run's state: how to rebuild the model and how the state is laid out."""
  graphdef: nnx.GraphDef
  optimizer: optax.GradientTransformation
  abstract_state: dict     # ShapeDtypeStructs of the state
  shardings: dict          # NamedShardings of the state, same tree
  vocab_size: int          # from the dataset: the unified vocabulary
  feature_dim: int         # from the dataset: width of `features`


def learning_rate_schedule(cfg: Config) -> optax.Schedule:
  t = cfg.train
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=t.warmup_steps,
      decay_steps=max(t.steps, t.warmup_steps + 1), end_value=t.learning_rate * t.min_lr_ratio)


def make_optimizer(cfg: Config, lr_scales=None) -> optax.GradientTransformation:
  """AdamW on the schedule, after a global-norm clip. `lr_scales`: a tree like the parameters of
  factors (scalars, or arrays that broadcast against the leaf) that multiply each update: a
  per-parameter learning rate (train/hf_grow.py `lr_scales`)."""
  t = cfg.train
  decay_matrices = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  adamw = optax.adamw(learning_rate_schedule(cfg), b1=t.b1, b2=t.b2,
                      weight_decay=t.weight_decay, mask=decay_matrices)
  parts = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
  parts.append(adamw)
  if lr_scales is not None:
    parts.append(optax.stateless(lambda updates, params=None: jax.tree.map(
        lambda u, s: (u * jnp.asarray(s, u.dtype)).astype(u.dtype), updates, lr_scales)))
  return optax.chain(*parts) if len(parts) > 1 else adamw


def has_router_state(cfg: Config) -> bool:
  """Whether the state keeps router controller state (runs without it keep their old layout)."""
  return cfg.model.moe.router == "dynamic" or cfg.model.moe.bias_update_rate > 0


def _new_model(cfg: Config, vocab_size: int, feature_dim: int, seed: int, mesh=None,
               platform: Platform = Platform()) -> Decoder:
  return Decoder(cfg.model, vocab_size=vocab_size, feature_dim=feature_dim, rngs=nnx.Rngs(seed),
                 mesh=mesh, platform=platform)


def make_setup(cfg: Config, mesh: Mesh, info, platform: Platform = Platform()) -> Setup:
  """The state's layout on `mesh` for a dataset whose `info` (data.DatasetInfo) sizes the model;
  the model (`graphdef`) is built for `platform` (default: this process's backend)."""
  vocab_size, feature_dim = info.vocab.size, info.feature_dim
  graphdef, abstract_params = nnx.split(nnx.eval_shape(
      lambda: _new_model(cfg, vocab_size, feature_dim, 0, mesh.abstract_mesh, platform)))
  params_sh = nnx.to_pure_dict(param_shardings(abstract_params, mesh))
  abstract_params = nnx.to_pure_dict(abstract_params)
  lr_scales = None
  if cfg.train.init_from and cfg.train.init_lr_scale != 1:
    from omnimoe.train import hf_grow
    lr_scales = hf_grow.lr_scales(cfg, info.vocab, abstract_params)
  optimizer = make_optimizer(cfg, lr_scales)
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  replicated = NamedSharding(mesh, P())
  opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, abstract_opt, params_sh,
                                 transform_non_params=lambda _: replicated)
  abstract_state = {"params": abstract_params, "opt_state": abstract_opt,
                    "step": jax.ShapeDtypeStruct((), jnp.int32),
                    "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
  shardings = {"params": params_sh, "opt_state": opt_sh, "step": replicated, "rng": replicated}
  if cfg.train.ema_decay > 0:     # the parameters' moving average: like the parameters
    abstract_state["ema"], shardings["ema"] = abstract_params, params_sh
  if has_router_state(cfg):
    abstract_state["router"] = jax.eval_shape(
        lambda: init_router_state(cfg.model.num_moe_layers, cfg.model.moe))
    shardings["router"] = jax.tree.map(lambda _: replicated, abstract_state["router"])
  return Setup(graphdef, optimizer, abstract_state, shardings, vocab_size, feature_dim)


def init_state(cfg: Config, setup: Setup, *, optimizer: bool = True) -> dict:
  """Initialises parameters and optimizer directly into their shardings (no host copy). With
  `optimizer=False` the state has no `opt_state` and no moving average (what `omnimoe import-hf`
  writes: restoring it starts both afresh, train/checkpoint.py)."""
  def init():
    seed = cfg.train.seed
    params = nnx.to_pure_dict(nnx.state(_new_model(cfg, setup.vocab_size, setup.feature_dim, seed)))
    state = {"params": params, "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.PRNGKey(seed + 1)}
    if optimizer:
      state["opt_state"] = setup.optimizer.init(params)
    if optimizer and "ema" in setup.abstract_state:
      state["ema"] = ema_start(params)
    if has_router_state(cfg):
      state["router"] = init_router_state(cfg.model.num_moe_layers, cfg.model.moe)
    return state
  shardings = {k: v for k, v in setup.shardings.items()
               if optimizer or k not in ("opt_state", "ema")}
  return jax.jit(init, out_shardings=shardings)()


def ema_start(params: dict) -> dict:
  """The moving average's first value: a copy of the parameters (its own buffers)."""
  return jax.tree.map(lambda p: jnp.array(p, copy=True), params)


def placed_ema_start(setup: Setup, params: dict) -> dict:
  """`ema_start` of parameters already on the mesh, placed into the moving average's shardings."""
  return jax.jit(ema_start, out_shardings=setup.shardings["ema"])(params)


def ema_update(ema: dict, params: dict, step, decay: float) -> dict:
  """One step of the moving average after the update that made `params` (step t = the step count
  before it): decay min(d, (1 + t) / (10 + t)), so the early average follows the fast-moving start."""
  t = jnp.asarray(step, jnp.float32)
  d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
  # e + (1 - d)(p - e), the same as d e + (1 - d) p, but exactly e where a weight stands still
  return jax.tree.map(lambda e, p: (e + (1.0 - d) * (p - e)).astype(e.dtype), ema, params)


def eval_params(state: dict) -> dict:
  """The parameters evaluation, generation and export use: the moving average when the run keeps
  one (train.ema_decay > 0), else the parameters."""
  return state.get("ema", state["params"])


def merge(setup: Setup, params: dict) -> Decoder:
  return nnx.merge(setup.graphdef, params)

"""The decoder: multimodal embedding, pre-norm blocks of attention + MoE, final norm, output head.

`Decoder(cfg, vocab_size=V, feature_dim=F, rngs=...)(batch, router) -> (logits_BxLxV float32, aux)`.
The batch is the data contract (tokens, features, modality, segment_ids, positions, and `order`
when rows were reordered (train/context_batch.py); targets and loss_weights are ignored). `router` is the router controller state kept by the trainer
(`init_router_state`; None = its initial value): {"threshold": float32 [M]} for the
dynamic router, {"bias": float32 [M, 3, E]} for the auxiliary-loss-free balance. aux: load_balance_loss and router_z_loss (scalars, mean over MoE layers); per MoE
layer (M = num_layers - num_dense_layers; `moe_layers` [M] holds their block indices):
expert_load [M, E], expert_load_by_modality [M, 3, E] (text, image, audio), active_fraction [M],
active_fraction_by_modality [M, 3], router_entropy [M], router_entropy_by_modality [M, 3],
coactivation_by_modality [M, 3, E, E] and expert_choice [M, B*L, K] (model/moe.py).
The first `num_dense_layers` blocks use a dense SwiGLU and return no aux.
`mesh` (a jax.sharding.AbstractMesh, None = none) is the mesh the model is laid out on: calls
trace under it, so activation constraints and the experts' shard_map see it (train.state sets it).
`platform` (model/expert_parallel.py `Platform`, default: this process's backend) is what the MoE
layers' experts are built for (`omnimoe plan --platform gpu` builds a GPU's program on CPUs).
The layers in `model.local_layers` attend within a sliding window of `model.attention_window`
positions (Gemma-style local layers; the others see the whole causal past).
Blocks run in a Python loop (compile time grows with num_layers), each under `model.remat`'s
jax checkpoint policy (REMAT_POLICIES; `none` = no checkpoint). With `model.scan_layers` the dense
blocks stay in `blocks` (unrolled, in front) and the M MoE blocks are one Block, `moe_stack`, whose
Variables carry a leading [M] axis named `layers` (mapped to no mesh axis): one `lax.scan` runs
them, the router state's per-layer slices are its xs and the per-layer aux its ys (the same [M, ...]
shapes), each step under the same remat policy. Parameter tree: unrolled blocks[i] (i < M + dense)
<-> scanned blocks[i] (dense i) and moe_stack[...][m] == unrolled blocks[num_dense_layers + m].
`hidden(batch, router) -> (h_BxLxD, aux)` stops before the head: `head_logits(h, head_DxV)` on any
slice of positions gives those positions' logits, so a loss can visit the positions chunk by chunk
(train/step.py) and never hold [B, L, V]; `in_mesh(fn, ...)` runs such a function on the model's mesh.
`decode(batch, cache, router) -> (logits, aux, cache)` is the same function on new positions
against a KV cache (model/kv_cache.py): generation prefills the prompt once, then one position per
step (train/generate.py).
"""
import jax
import jax.numpy as jnp
from flax import nnx

from omnimoe.model import kv_cache
from omnimoe.model.blockwise_attention import NO_WINDOW
from omnimoe.model.config import REMAT, ModelConfig, check_dense_layers, layer_windows, one_of
from omnimoe.model.embed import MultimodalEmbed
from omnimoe.model.expert_parallel import Platform
from omnimoe.model.mlp import SwiGLU
from omnimoe.model.moe import MoE
from omnimoe.model.norm import RMSNorm
from omnimoe.model.rope import rope_angles
from omnimoe.model.router import init_router_state
from omnimoe.model.self_attention import SelfAttention
from omnimoe.model.sharding import constrain, param, require_auto_axes

ACT = ("batch", "length", "act_embed")

# model.remat -> what jax.checkpoint keeps from a block's forward pass (the rest is recomputed)
REMAT_POLICIES = {"full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def head_logits(h_BxLxD: jax.Array, head_DxV: jax.Array) -> jax.Array:
  """float32 logits of the final hidden states (any number of positions L)."""
  logits_BxLxV = jnp.einsum("bld,dv->blv", h_BxLxD, head_DxV.astype(h_BxLxD.dtype),
                            preferred_element_type=jnp.float32)
  return constrain(logits_BxLxV, ("batch", "length", "act_vocab"))


def _block_runner(remat: str):
  """`run(block, *args)`: the block's call, under the checkpoint policy `remat` names."""
  one_of("model.remat", remat, REMAT)
  call = lambda block, *args: block(*args)
  return call if remat == "none" else nnx.remat(call, policy=REMAT_POLICIES[remat])


class Block(nnx.Module):
  """x + attn(norm(x)), then + moe(norm(x)) (or + mlp(norm(x)) in a dense block, aux None)."""

  def __init__(self, cfg: ModelConfig, *, dense: bool = False, rngs: nnx.Rngs,
               platform: Platform = Platform()):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.dense = dense
    self.attn_norm = RMSNorm(cfg.d_model, names=("embed",), **kw)
    self.attn = SelfAttention(cfg, rngs=rngs)
    if dense:
      self.mlp_norm = RMSNorm(cfg.d_model, names=("embed",), **kw)
      self.mlp = SwiGLU(cfg.d_model, cfg.dense_hidden, **kw)
    else:
      self.moe_norm = RMSNorm(cfg.d_model, names=("embed",), **kw)
      self.moe = MoE(cfg.d_model, cfg.moe, platform=platform, **kw)

  def __call__(self, x_BxLxD, segment_ids_BxL, modality_BxL, angles_BxLxP, order_BxL=None,
               threshold=None, bias_MxE=None, window=NO_WINDOW):
    with jax.named_scope("attention"):
      x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), segment_ids_BxL, angles_BxLxP,
                                    order_BxL, window)
    if self.dense:
      with jax.named_scope("mlp"):
        return constrain(x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD)), ACT), None
    with jax.named_scope("moe"):
      y_BxLxD, aux = self.moe(self.moe_norm(x_BxLxD), segment_ids_BxL, modality_BxL,
                              threshold=threshold, bias_MxE=bias_MxE)
    return constrain(x_BxLxD + y_BxLxD, ACT), aux

  def decode(self, x_BxLxD, segment_ids_BxL, modality_BxL, angles_BxLxP, kv, cache_seg_BxS, end,
             threshold=None, bias_MxE=None, window=NO_WINDOW):
    """The block on new positions against its KV cache `kv`: (x, aux, kv) (model/kv_cache.py)."""
    a_BxLxD, kv = self.attn.cached(self.attn_norm(x_BxLxD), segment_ids_BxL, angles_BxLxP, kv,
                                   cache_seg_BxS, end, window)
    x_BxLxD = x_BxLxD + a_BxLxD
    if self.dense:
      return constrain(x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD)), ACT), None, kv
    y_BxLxD, aux = self.moe(self.moe_norm(x_BxLxD), segment_ids_BxL, modality_BxL,
                            threshold=threshold, bias_MxE=bias_MxE)
    return constrain(x_BxLxD + y_BxLxD, ACT), aux, kv


def stack_blocks(blocks: list[Block]) -> Block:
  """blocks[0], each Variable now holding all blocks' values stacked on a leading `layers` axis."""
  paths = [{p: v for p, v in nnx.iter_graph(b) if isinstance(v, nnx.Variable)} for b in blocks]
  for path, var in paths[0].items():
    value = jnp.stack([vs[path].get_value() for vs in paths])
    names = var.get_metadata().get("out_sharding") or (None,) * (value.ndim - 1)
    var.set_value(value)
    var.set_metadata(out_sharding=("layers", *names))
  return blocks[0]


def scan_blocks(stack: Block, run_block, x_BxLxD, rest: tuple, per_layer: tuple):
  """(x after every layer of `stack` in turn, their aux stacked [M, ...]): one lax.scan whose xs
  are the layers' Variables and per-layer inputs (threshold [M], bias [M, 3, E] or None, and the
  attention windows int32 [M] when some layer is local)."""
  graphdef, state = nnx.split(stack)

  def body(x_BxLxD, layer):
    layer_state, *inputs = layer
    return run_block(nnx.merge(graphdef, layer_state), x_BxLxD, *rest, *inputs)

  with jax.named_scope("scanned_blocks"):
    return jax.lax.scan(body, x_BxLxD, (state, *per_layer))


class Decoder(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, vocab_size: int, feature_dim: int, rngs: nnx.Rngs,
               mesh: jax.sharding.AbstractMesh | None = None, platform: Platform = Platform()):
    self.cfg = cfg
    self.mesh = mesh
    self.embed = MultimodalEmbed(vocab_size, feature_dim, cfg.d_model, dtype=cfg.dtype,
                                 param_dtype=cfg.param_dtype, rngs=rngs)
    check_dense_layers(cfg.num_dense_layers, cfg.num_layers)
    _block_runner(cfg.remat)                          # a bad model.remat fails here, in one line
    blocks = [Block(cfg, dense=i < cfg.num_dense_layers, rngs=rngs, platform=platform)
              for i in range(cfg.num_layers)]
    if cfg.scan_layers:                               # same draws as unrolled, then stacked
      self.blocks = nnx.List(blocks[:cfg.num_dense_layers])
      self.moe_stack = stack_blocks(blocks[cfg.num_dense_layers:])
    else:
      self.blocks = nnx.List(blocks)
    self.final_norm = RMSNorm(cfg.d_model, names=("embed",), dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, rngs=rngs)
    self.head_DxV = param(rngs, jax.nn.initializers.normal(cfg.d_model ** -0.5),
                          (cfg.d_model, vocab_size), ("embed", "vocab"), cfg.param_dtype)

  def __call__(self, batch: dict, router: dict | None = None) -> tuple[jax.Array, dict]:
    """(logits_BxLxV float32, aux)."""
    h_BxLxD, aux = self.hidden(batch, router)
    with jax.named_scope("head"):
      return self.in_mesh(head_logits, h_BxLxD, self.head_DxV[...]), aux

  def hidden(self, batch: dict, router: dict | None = None) -> tuple[jax.Array, dict]:
    """(h_BxLxD, aux): the final-normed hidden states the head reads."""
    return self.in_mesh(self._forward, batch, router)

  def in_mesh(self, fn, *args):
    """fn(*args) traced under the model's mesh (as is, when there is none or one is set)."""
    if self.mesh is None or not jax.sharding.get_abstract_mesh().empty:
      return fn(*args)
    with jax.sharding.use_abstract_mesh(self.mesh):
      return fn(*args)

  def _inputs(self, batch: dict, router: dict | None):
    """(router state, segment_ids, modality, rope angles, embedded x) of a batch."""
    cfg = self.cfg
    router = init_router_state(cfg.num_moe_layers, cfg.moe) if router is None else router
    require_auto_axes(batch["segment_ids"])
    segment_ids_BxL = jnp.asarray(batch["segment_ids"], jnp.int32)
    modality_BxL = jnp.asarray(batch["modality"], jnp.int32)
    angles_BxLxP = rope_angles(jnp.asarray(batch["positions"]), cfg.head_dim, cfg.rope_sections,
                               cfg.rope_theta)
    with jax.named_scope("embed"):
      x_BxLxD = self.embed(jnp.asarray(batch["tokens"], jnp.int32),
                           jnp.asarray(batch["features"]), modality_BxL)
    return router, segment_ids_BxL, modality_BxL, angles_BxLxP, constrain(x_BxLxD, ACT)

  def _forward(self, batch: dict, router: dict | None) -> tuple[jax.Array, dict]:
    cfg = self.cfg
    router, segment_ids_BxL, modality_BxL, angles_BxLxP, x_BxLxD = self._inputs(batch, router)
    auxes, run_block = [], _block_runner(cfg.remat)
    per_layer_router = (router["threshold"], router.get("bias"))
    order_BxL = batch.get("order")                   # 1-D order of reordered rows (None: index)
    rest = (segment_ids_BxL, modality_BxL, angles_BxLxP,
            None if order_BxL is None else jnp.asarray(order_BxL, jnp.int32))
    windows = layer_windows(cfg)                      # a global layer keeps the Python default
    for i, block in enumerate(self.blocks):
      moe_index = i - cfg.num_dense_layers            # router state is kept per MoE layer
      per_layer = (None, None) if block.dense else jax.tree.map(lambda a: a[moe_index],
                                                                 per_layer_router)
      local = () if windows[i] == NO_WINDOW else (windows[i],)
      x_BxLxD, aux = run_block(block, x_BxLxD, *rest, *per_layer, *local)
      if aux is not None:
        auxes.append(aux)
    if cfg.scan_layers:
      scanned = windows[cfg.num_dense_layers:]
      local = (() if all(w == NO_WINDOW for w in scanned)
               else (jnp.asarray(scanned, jnp.int32),))
      x_BxLxD, stacked = scan_blocks(self.moe_stack, run_block, x_BxLxD, rest,
                                     (*per_layer_router, *local))
    else:
      stacked = {k: jnp.stack([a[k] for a in auxes]) for k in auxes[0]}
    return self._finish(x_BxLxD, stacked)

  def _finish(self, x_BxLxD, stacked: dict) -> tuple[jax.Array, dict]:
    cfg = self.cfg
    with jax.named_scope("final_norm"):
      h_BxLxD = self.final_norm(x_BxLxD)
    aux = dict(stacked, load_balance_loss=stacked["load_balance_loss"].mean(),
               router_z_loss=stacked["router_z_loss"].mean(),
               moe_layers=jnp.arange(cfg.num_dense_layers, cfg.num_layers, dtype=jnp.int32))
    return h_BxLxD, aux

  def decode(self, batch: dict, cache: dict, router: dict | None = None):
    """(logits_BxLxV float32, aux, cache): the batch's L new positions (tokens, features,
    modality, segment_ids, positions; [B, L]) appended to the KV cache (model/kv_cache.py),
    each attending over everything in it: prefill with the prompt, then one position per step."""
    def run(batch, cache, router):
      h_BxLxD, aux, cache = self._forward_cached(batch, cache, router)
      return head_logits(h_BxLxD, self.head_DxV[...]), aux, cache
    return self.in_mesh(run, batch, cache, router)

  def _forward_cached(self, batch: dict, cache: dict, router: dict | None):
    cfg = self.cfg
    router, segment_ids_BxL, modality_BxL, angles_BxLxP, x_BxLxD = self._inputs(batch, router)
    cache = kv_cache.append_segments(cache, segment_ids_BxL)
    rest = (segment_ids_BxL, modality_BxL, angles_BxLxP)
    at = (cache["segment_ids"], cache["end"])
    per_layer_router = (router["threshold"], router.get("bias"))
    windows = layer_windows(cfg)
    auxes, kvs = [], []
    for i, block in enumerate(self.blocks):
      per_layer = (None, None) if block.dense else jax.tree.map(
          lambda a: a[i - cfg.num_dense_layers], per_layer_router)
      x_BxLxD, aux, kv = block.decode(x_BxLxD, *rest, cache["blocks"][i], *at, *per_layer,
                                      windows[i])
      kvs.append(kv)
      if aux is not None:
        auxes.append(aux)
    cache = dict(cache, blocks=kvs)
    if cfg.scan_layers:
      graphdef, state = nnx.split(self.moe_stack)

      def body(x_BxLxD, layer):
        layer_state, kv, threshold, bias, window = layer
        x_BxLxD, aux, kv = nnx.merge(graphdef, layer_state).decode(
            x_BxLxD, *rest, kv, *at, threshold, bias, window)
        return x_BxLxD, (aux, kv)
      scanned = jnp.asarray(windows[cfg.num_dense_layers:], jnp.int32)
      x_BxLxD, (stacked, kv) = jax.lax.scan(
          body, x_BxLxD, (state, cache["moe_stack"], *per_layer_router, scanned))
      cache = dict(cache, moe_stack=kv)
    else:
      stacked = {k: jnp.stack([a[k] for a in auxes]) for k in auxes[0]}
    h_BxLxD, aux = self._finish(x_BxLxD, stacked)
    return h_BxLxD, aux, kv_cache.advance(cache, segment_ids_BxL.shape[1])

"""A tiny random Qwen3-MoE written and run by transformers itself: the oracle of test_hf_*.py.

GQA (4 query heads on 2 key/value heads), QK-norm, head_dim 12 != d_model / heads = 8, a RoPE base
of 1000 (not the default), three layers of which the first is dense (`mlp_only_layers: [0]`) and two
are MoE (4 experts, top 2, renormalised). Its vocabulary is 512 rows, the size of omnimoe's default
dataset's (so `omnimoe train` can take a few steps from the imported checkpoint). The weights are
redrawn at the scale of a trained model (unit-variance activations, norm scales around 1), so that
attention, routing and every expert matter to the logits.
"""
import pathlib
import types

import numpy as np

VOCAB = 512
OMNIMOE_KEYS = {"model.d_model": 32, "model.num_layers": 3, "model.num_heads": 4,
                "model.num_kv_heads": 2, "model.head_dim": 12, "model.num_dense_layers": 1,
                "model.dense_hidden": 48, "model.moe.num_experts": 4, "model.moe.top_k": 2,
                "model.moe.expert_hidden": 16, "model.rope_theta": 1000.0}


def config(**changes):
  import transformers
  kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
            num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0],
            rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
            max_position_embeddings=128, tie_word_embeddings=False, rms_norm_eps=1e-6)
  kw.update(changes)
  return transformers.Qwen3MoeConfig(**kw)


def write(folder, *, seed: int = 0, max_shard_size: str = "5GB", dtype: str = "float32",
          **changes):
  """Writes the model with `save_pretrained` (safetensors of `dtype`) and returns it."""
  import torch
  import transformers
  torch.manual_seed(seed)
  model = transformers.Qwen3MoeForCausalLM(config(**changes)).float().eval()
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:
        p.copy_(1 + 0.3 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
  if dtype != "float32":
    model = model.to(getattr(torch, dtype))
  model.save_pretrained(folder, max_shard_size=max_shard_size)
  return model


def logits(model, ids: np.ndarray) -> np.ndarray:
  """transformers' float32 logits [B, L, V] of token ids [B, L] (positions 0..L-1, causal)."""
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(ids, np.int64))).logits.float().numpy()


def load(folder):
  import transformers
  return transformers.Qwen3MoeForCausalLM.from_pretrained(folder, dtype="float32").eval()


def text_batch(ids: np.ndarray, feature_dim: int) -> dict:
  """omnimoe's batch of text ids (one segment a row, positions 0..L-1 on t, h and w)."""
  B, L = ids.shape
  positions = np.broadcast_to(np.arange(L, dtype=np.int32)[None, :, None], (B, L, 3))
  return {"tokens": np.asarray(ids, np.int32), "features": np.zeros((B, L, feature_dim), np.float32),
          "modality": np.ones((B, L), np.int32), "segment_ids": np.ones((B, L), np.int32),
          "positions": np.ascontiguousarray(positions)}


def omnimoe_logits(workdir: pathlib.Path, ids: np.ndarray, vocab: int = VOCAB) -> np.ndarray:
  """The logits of the run's latest checkpoint, restored the way `omnimoe train`/`eval` do (its
  moving average of the weights where it keeps one, as evaluation and export use)."""
  import jax
  from omnimoe.data.config import feature_dim
  from omnimoe.train import config as config_lib
  from omnimoe.train.checkpoint import Checkpoints
  from omnimoe.train.mesh import make_mesh
  from omnimoe.train.state import eval_params, make_setup, merge
  cfg = config_lib.load(workdir / "config.yaml")
  info = types.SimpleNamespace(vocab=types.SimpleNamespace(size=vocab),
                               feature_dim=feature_dim(cfg.data))
  setup = make_setup(cfg, make_mesh(cfg.mesh), info)
  ckpts = Checkpoints(workdir / "checkpoints", keep=3, async_save=False)
  state, _ = ckpts.restore(ckpts.latest_step(), setup)
  ckpts.close()
  run = jax.jit(lambda params, batch: merge(setup, params)(batch)[0])
  return np.asarray(run(eval_params(state), text_batch(ids, info.feature_dim)))

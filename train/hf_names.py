"""Which Hugging Face Qwen3-MoE tensors make each omnimoe parameter, and how.

A `Weight` is one omnimoe parameter (its path in the parameter tree of an unrolled model,
model/decoder.py) and the Qwen3-MoE tensors it is made of, with their shapes (as config.json
implies them) and the two maps: `to_omnimoe(tensors) -> array` and `to_hf(array) -> tensors`, which
only transpose, reshape, stack and split (so a round trip is bit-exact). A torch Linear keeps
[out, in]; omnimoe keeps [in, out] with the heads split out (`wq_DxHxDh`) and the experts stacked on
a leading axis (`w_gate_ExDxH`). Everything else omnimoe has (the media embedders) is its own.

Qwen3-MoE checkpoints keep one tensor per expert (`mlp.experts.<e>.gate_proj.weight`), the form
the released models and `save_pretrained` use; that is the form read and written here.
"""
import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Weight:
  path: tuple                           # into the omnimoe parameter tree
  names: tuple[str, ...]                # the Qwen3-MoE tensors, in the order the maps use
  shapes: tuple[tuple[int, ...], ...]   # their shapes
  to_omnimoe: Callable                  # list of tensors -> the omnimoe array
  to_hf: Callable                       # the omnimoe array -> list of tensors


def _same(name: str, path: tuple, shape: tuple) -> Weight:
  return Weight(path, (name,), (shape,), lambda ts: ts[0], lambda a: [a])


def _linear(name: str, path: tuple, out_in: tuple, omnimoe_shape: tuple) -> Weight:
  """A torch Linear [out, in] <-> its transpose, reshaped to `omnimoe_shape`."""
  return Weight(path, (name,), (out_in,),
                lambda ts: ts[0].T.reshape(omnimoe_shape),
                lambda a: [a.reshape(out_in[::-1]).T])


def _experts(names: list[str], path: tuple, out_in: tuple) -> Weight:
  """E per-expert Linears [out, in] <-> one [E, in, out] array."""
  E = len(names)
  return Weight(path, tuple(names), (out_in,) * E,
                lambda ts: np.stack([t.T for t in ts]),
                lambda a: [a[e].T for e in range(E)])


def _attention(i: int, m) -> list[Weight]:
  D, H, K, Dh = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim
  hf, at = f"model.layers.{i}.self_attn.", ("blocks", i, "attn")
  return [_linear(hf + "q_proj.weight", at + ("wq_DxHxDh",), (H * Dh, D), (D, H, Dh)),
          _linear(hf + "k_proj.weight", at + ("wk_DxKxDh",), (K * Dh, D), (D, K, Dh)),
          _linear(hf + "v_proj.weight", at + ("wv_DxKxDh",), (K * Dh, D), (D, K, Dh)),
          _linear(hf + "o_proj.weight", at + ("wo_HxDhxD",), (D, H * Dh), (H, Dh, D)),
          _same(hf + "q_norm.weight", at + ("q_norm", "scale"), (Dh,)),
          _same(hf + "k_norm.weight", at + ("k_norm", "scale"), (Dh,))]


def _feed_forward(i: int, m) -> list[Weight]:
  D, hf, block = m.d_model, f"model.layers.{i}.mlp.", ("blocks", i)
  if i < m.num_dense_layers:
    I, at = m.dense_hidden, block + ("mlp",)
    return [_same(f"model.layers.{i}.post_attention_layernorm.weight", block + ("mlp_norm", "scale"),
                  (D,)),
            _linear(hf + "gate_proj.weight", at + ("w_gate_DxH",), (I, D), (D, I)),
            _linear(hf + "up_proj.weight", at + ("w_up_DxH",), (I, D), (D, I)),
            _linear(hf + "down_proj.weight", at + ("w_down_HxD",), (D, I), (I, D))]
  E, I, at = m.moe.num_experts, m.moe.expert_hidden, block + ("moe",)
  expert = lambda part: [f"{hf}experts.{e}.{part}.weight" for e in range(E)]
  return [_same(f"model.layers.{i}.post_attention_layernorm.weight", block + ("moe_norm", "scale"),
                (D,)),
          _linear(hf + "gate.weight", at + ("router_DxE",), (E, D), (D, E)),
          _experts(expert("gate_proj"), at + ("w_gate_ExDxH",), (I, D)),
          _experts(expert("up_proj"), at + ("w_up_ExDxH",), (I, D)),
          _experts(expert("down_proj"), at + ("w_down_ExHxD",), (D, I))]


def weights(m, vocab_size: int) -> list[Weight]:
  """Every omnimoe parameter that a Qwen3-MoE tensor makes, for omnimoe ModelConfig `m` and an HF
  vocabulary of `vocab_size` rows (the first rows of omnimoe's embedding and head)."""
  D, V = m.d_model, vocab_size
  out = [_same("model.embed_tokens.weight", ("embed", "table_VxD"), (V, D))]
  for i in range(m.num_layers):
    out.append(_same(f"model.layers.{i}.input_layernorm.weight", ("blocks", i, "attn_norm", "scale"),
                     (D,)))
    out += _attention(i, m)
    out += _feed_forward(i, m)
  out += [_same("model.norm.weight", ("final_norm", "scale"), (D,)),
          _linear("lm_head.weight", ("head_DxV",), (V, D), (D, V))]
  return out


def get(tree, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def put(tree, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value

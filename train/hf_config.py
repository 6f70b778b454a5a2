"""A Hugging Face Qwen3-MoE `config.json` <-> omnimoe's model keys, with every option one side
cannot express refused in one line that names it (an HfError; the command line exits 2).

On text omnimoe's decoder is the function transformers' `Qwen3MoeForCausalLM` computes (docs/
huggingface.md): RMSNorm (eps 1e-6), QK-norm, half-rotated RoPE (M-RoPE with t = h = w), GQA,
SwiGLU experts whose top-k router probabilities are renormalised to sum 1, an untied head, and
dense SwiGLU blocks where Qwen3-MoE has `mlp_only_layers` (a prefix of the layers here).

`model_keys(hf)` -> {omnimoe config key: value} of a config.json; `hf_config(model, vocab_size)`
-> the config.json of an omnimoe model (the inverse on every key it sets).
"""
import json
import pathlib

MODEL_TYPE = "qwen3_moe"
ARCHITECTURE = "Qwen3MoeForCausalLM"
NORM_EPS = 1e-6       # model/norm.py's fixed epsilon


class HfError(ValueError):
  """A Hugging Face folder or an omnimoe run that cannot be converted; the message is one line."""


def read_config(folder: pathlib.Path) -> dict:
  """`folder/config.json` as a dict, checked to be a Qwen3-MoE causal LM."""
  path = pathlib.Path(folder) / "config.json"
  if not path.is_file():
    raise HfError(f"{path}: no such file (a Hugging Face model folder holds config.json and "
                  "*.safetensors)")
  try:
    hf = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise HfError(f"{path}: not readable JSON ({e})") from None
  if not isinstance(hf, dict) or hf.get("model_type") != MODEL_TYPE:
    kind = hf.get("model_type") if isinstance(hf, dict) else None
    raise HfError(f"{path}: model_type {kind!r} is not Qwen3-MoE; omnimoe imports "
                  f"model_type '{MODEL_TYPE}' ({ARCHITECTURE}) only")
  archs = hf.get("architectures") or [ARCHITECTURE]
  if ARCHITECTURE not in archs:
    raise HfError(f"{path}: architectures {archs} has no {ARCHITECTURE}; omnimoe imports the "
                  "causal language model only")
  return hf


def _rope_theta(hf: dict, where: str) -> float:
  """RoPE base of a config.json in either spelling (`rope_parameters`, or `rope_theta` with
  `rope_scaling`); any rope type but the default is refused."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  for key, table in (("rope_parameters", params), ("rope_scaling", scaling)):
    kind = table.get("rope_type", table.get("type", "default"))
    if kind != "default":
      raise HfError(f"{where}: {key} rope_type {kind!r} is not supported (omnimoe's RoPE is the "
                    "default, unscaled one)")
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def dense_prefix(hf: dict, where: str) -> int:
  """How many leading layers are dense, by Qwen3-MoE's rule (a layer is sparse unless it is in
  `mlp_only_layers` or (i + 1) % decoder_sparse_step != 0); refused unless they are a prefix."""
  n, step = hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1) or 1
  only = set(hf.get("mlp_only_layers") or [])
  dense = [i for i in range(n) if i in only or (i + 1) % step != 0 or hf["num_experts"] <= 0]
  if dense != list(range(len(dense))) or len(dense) >= n:
    raise HfError(f"{where}: dense layers {dense} (mlp_only_layers {sorted(only)}, "
                  f"decoder_sparse_step {step}) are not a prefix of the {n} layers followed by "
                  "MoE layers; omnimoe's dense blocks are the first model.num_dense_layers")
  return len(dense)


def _refuse(hf: dict, where: str) -> None:
  """Options of a Qwen3-MoE that omnimoe cannot express, each named."""
  bad = {"tie_word_embeddings": (True, "omnimoe's output head is its own matrix"),
         "attention_bias": (True, "omnimoe's projections have no bias"),
         "use_sliding_window": (True, "set model.local_layers after import instead"),
         "norm_topk_prob": (False, "omnimoe renormalises the top-k probabilities")}
  for key, (value, why) in bad.items():
    if hf.get(key, not value) == value:
      raise HfError(f"{where}: {key}: {json.dumps(value)} is not supported ({why})")
  if hf.get("hidden_act", "silu") != "silu":
    raise HfError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (SwiGLU uses silu)")
  eps = hf.get("rms_norm_eps", NORM_EPS)
  if eps != NORM_EPS:
    raise HfError(f"{where}: rms_norm_eps {eps} is not supported (omnimoe's RMSNorm uses "
                  f"{NORM_EPS})")


def rope_sections(head_dim: int) -> tuple[int, int, int]:
  """(t, h, w) rotary pairs: any split is the same 1-D RoPE on text; this one keeps the default
  config's proportions (half of the pairs for time)."""
  half = head_dim // 2
  return (half - 2 * (half // 4), half // 4, half // 4)


ALIASES = {"num_local_experts": "num_experts"}   # transformers 5 writes the first for the second


def model_keys(hf: dict, where: str = "config.json") -> dict:
  """{omnimoe config key: value} that make omnimoe's decoder the config.json's function."""
  hf = {**{ALIASES[k]: v for k, v in hf.items() if k in ALIASES}, **hf}
  missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                         "num_experts", "num_experts_per_tok", "moe_intermediate_size")
             if not isinstance(hf.get(k), int)]
  if missing:
    raise HfError(f"{where}: {missing[0]} is missing or not an integer")
  _refuse(hf, where)
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  return {
      "model.d_model": hf["hidden_size"],
      "model.num_layers": hf["num_hidden_layers"],
      "model.num_heads": heads,
      "model.num_kv_heads": hf.get("num_key_value_heads") or heads,
      "model.head_dim": head_dim,
      "model.rope_theta": _rope_theta(hf, where),
      "model.rope_sections": rope_sections(head_dim),
      "model.qk_norm": True,
      "model.local_layers": (),
      "model.attention_window": 0,
      "model.num_dense_layers": dense_prefix(hf, where),
      "model.dense_hidden": hf.get("intermediate_size") or 1,
      "model.moe.num_experts": hf["num_experts"],
      "model.moe.top_k": hf["num_experts_per_tok"],
      "model.moe.expert_hidden": hf["moe_intermediate_size"],
      "model.moe.router": "topk",
      "model.moe.lone_expert": "one",
      "model.moe.num_shared_experts": 0,
      "model.moe.max_groups": 0,
      "model.moe.bias_update_rate": 0.0,
  }


def refuse_export(model) -> None:
  """Settings of an omnimoe model (a ModelConfig) with no Qwen3-MoE equivalent, each named."""
  moe = model.moe
  checks = [
      (moe.router != "topk", f"model.moe.router={moe.router}",
       "Qwen3-MoE routes a fixed top-k"),
      (moe.num_shared_experts > 0, f"model.moe.num_shared_experts={moe.num_shared_experts}",
       "Qwen3-MoE has no shared experts"),
      (moe.max_groups > 0, f"model.moe.max_groups={moe.max_groups}",
       "Qwen3-MoE has no group-limited routing"),
      (moe.bias_update_rate > 0, f"model.moe.bias_update_rate={moe.bias_update_rate}",
       "Qwen3-MoE has no balance bias ranking the experts"),
      (moe.top_k == 1 and moe.lone_expert != "one", f"model.moe.lone_expert={moe.lone_expert}",
       "at top_k 1 Qwen3-MoE weights the expert 1"),
      (not model.qk_norm, "model.qk_norm=false", "Qwen3-MoE always normalises queries and keys"),
      (bool(model.local_layers), f"model.local_layers={list(model.local_layers)}",
       "Qwen3-MoE's layers attend globally"),
  ]
  for bad, setting, why in checks:
    if bad:
      raise HfError(f"{setting} has no Qwen3-MoE equivalent ({why}); export-hf refuses it")


def hf_config(model, vocab_size: int, torch_dtype: str) -> dict:
  """The config.json of a Qwen3-MoE computing omnimoe `model`'s function on text."""
  refuse_export(model)
  n = model.num_dense_layers
  return {
      "architectures": [ARCHITECTURE],
      "model_type": MODEL_TYPE,
      "vocab_size": vocab_size,
      "hidden_size": model.d_model,
      "num_hidden_layers": model.num_layers,
      "num_attention_heads": model.num_heads,
      "num_key_value_heads": model.num_kv_heads,
      "head_dim": model.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": NORM_EPS,
      "rope_theta": model.rope_theta,
      "rope_scaling": None,
      "attention_bias": False,
      "use_sliding_window": False,
      "tie_word_embeddings": False,
      "intermediate_size": model.dense_hidden if n else model.moe.expert_hidden,
      "mlp_only_layers": list(range(n)),
      "decoder_sparse_step": 1,
      "num_experts": model.moe.num_experts,
      "num_experts_per_tok": model.moe.top_k,
      "moe_intermediate_size": model.moe.expert_hidden,
      "norm_topk_prob": True,
      "torch_dtype": torch_dtype,
  }

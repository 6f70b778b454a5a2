"""omnimoe data: prepared folders (the user's, written by `omnimoe prepare`, and the built-in
default dataset's) mixed by weight, packed into the batch contract on grain.

Rooms: the shared pieces at the top (config, vocab, examples, records, packing, tokenizer);
`builtin/` the default dataset as files and its cached prepared folders; `prepare/` manifest ->
prepared folder (and reading one back); `pipeline/` sources, the training stream, held-out batches
and the cross-modal eval sets.

Public API (the trainer depends on these names):
  dataset_info(cfg, seed) -> DatasetInfo(vocab, feature_dim)
  train_iterator(cfg, *, batch_size, seed, process_index=0, process_count=1) -> grain iterator
  eval_batches(cfg, *, batch_size, seed, num_batches) -> list of batches
  eval_batches_by_source(cfg, *, batch_size, seed, num_batches) -> [(source label, batches), ...]
  has_default_source(cfg) -> bool: whether the two default-dataset evals below apply
  heldout_text_batches(cfg, *, batch_size, seed) -> list of batches (bits per byte)
  heldout_text_bytes(cfg, *, batch_size) -> UTF-8 bytes of each of those batches
  prompt_set(cfg, *, modality, seed, max_new_tokens, limit=None) -> PromptSet
  retrieval_sets(cfg, *, batch_size, seed) -> [RetrievalSet]: held-out needle documents by length
  video_prompt_sets(cfg, *, seed, limit) -> {name: PromptSet}: fresh clips, video->text and sync

The names load on first use (PEP 562), so `omnimoe.data.config` and the modules that need only it
(the train config, the model-only benchmarks on a machine without grain) import without the
pipeline's dependencies.
"""
import importlib

_WHERE = {
    "EVAL_PROMPT": ("omnimoe.data.builtin.captions", "EVAL_PROMPT"),
    "DataConfig": ("omnimoe.data.config", "DataConfig"),
    "BATCH_KEYS": ("omnimoe.data.packing", "BATCH_KEYS"),
    "DatasetInfo": ("omnimoe.data.pipeline.api", "DatasetInfo"),
    "dataset_info": ("omnimoe.data.pipeline.api", "dataset_info"),
    "eval_batches": ("omnimoe.data.pipeline.api", "eval_batches"),
    "eval_batches_by_source": ("omnimoe.data.pipeline.api", "eval_batches_by_source"),
    "train_iterator": ("omnimoe.data.pipeline.api", "train_iterator"),
    "RetrievalSet": ("omnimoe.data.pipeline.needle", "RetrievalSet"),
    "retrieval_sets": ("omnimoe.data.pipeline.needle", "retrieval_sets"),
    "heldout_text_batches": ("omnimoe.data.pipeline.heldout_text", "heldout_text_batches"),
    "heldout_text_bytes": ("omnimoe.data.pipeline.heldout_text", "heldout_text_bytes"),
    "PromptSet": ("omnimoe.data.pipeline.prompts", "PromptSet"),
    "prompt_set": ("omnimoe.data.pipeline.prompts", "prompt_set"),
    "has_default_source": ("omnimoe.data.pipeline.sources", "has_default"),
    "video_prompt_sets": ("omnimoe.data.pipeline.video_prompts", "video_prompt_sets"),
    "Vocab": ("omnimoe.data.vocab", "Vocab"),
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
  if name not in _WHERE:
    raise AttributeError(f"module 'omnimoe.data' has no attribute {name!r}")
  module, attr = _WHERE[name]
  value = getattr(importlib.import_module(module), attr)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_WHERE))

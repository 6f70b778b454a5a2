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
"""
from omnimoe.data.builtin.captions import EVAL_PROMPT
from omnimoe.data.config import DataConfig
from omnimoe.data.packing import BATCH_KEYS
from omnimoe.data.pipeline.api import (DatasetInfo, dataset_info, eval_batches,
                                       eval_batches_by_source, train_iterator)
from omnimoe.data.pipeline.needle import RetrievalSet, retrieval_sets
from omnimoe.data.pipeline.heldout_text import heldout_text_batches, heldout_text_bytes
from omnimoe.data.pipeline.prompts import PromptSet, prompt_set
from omnimoe.data.pipeline.sources import has_default as has_default_source
from omnimoe.data.pipeline.video_prompts import video_prompt_sets
from omnimoe.data.vocab import Vocab

__all__ = [
    "BATCH_KEYS", "DataConfig", "DatasetInfo", "EVAL_PROMPT", "PromptSet", "RetrievalSet", "Vocab",
    "dataset_info", "eval_batches", "eval_batches_by_source", "has_default_source",
    "heldout_text_batches", "heldout_text_bytes", "prompt_set", "retrieval_sets", "train_iterator",
    "video_prompt_sets",
]

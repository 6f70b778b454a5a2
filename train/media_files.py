"""What a run needs to turn codes back into media travels with its checkpoints:
`<workdir>/media/` holds the codebooks the run trained with (`codebooks.npz`), its text tokenizer
file when it has one (copied), and `media.json` (the vocabulary's layout and the feature width).

`omnimoe train` writes it when a run starts (process 0; again on a resume, the same content).
`omnimoe generate` reads it, so a run folder copied to another machine, or one whose prepared data
folders have moved, still codes prompts and decodes generated images and tones; a run folder from
before it was written falls back to the data config's folders.
"""
import json
import pathlib
import shutil
import types

import numpy as np

from omnimoe.data import tokenizer as tokenizer_lib
from omnimoe.data.vocab import Vocab

FOLDER = "media"
VOCAB_FIELDS = ("image_codes", "audio_codes", "video_codes", "text_tokens", "tokenizer_fingerprint")
LAYOUT_FIELDS = ("text_offset", "appended", "pad", "bos", "eos")   # absent before 2026-12-02: bytes'


def save(workdir: pathlib.Path, mix) -> None:
  """Writes `<workdir>/media/` from the run's data mixture (data/pipeline/sources.py)."""
  folder = pathlib.Path(workdir) / FOLDER
  folder.mkdir(parents=True, exist_ok=True)
  np.savez(folder / "codebooks.npz", **{k: np.asarray(v, np.float32)
                                        for k, v in mix.codebooks.items()})
  record = {k: getattr(mix.vocab, k) for k in VOCAB_FIELDS + LAYOUT_FIELDS}
  record["feature_dim"] = int(mix.feature_dim)
  record["tokenizer_file"] = ""
  if mix.vocab.tokenizer:
    source = pathlib.Path(mix.vocab.tokenizer)
    name = "tokenizer" + source.suffix
    if source.resolve() != (folder / name).resolve():
      shutil.copyfile(source, folder / name)
    record["tokenizer_file"] = name
  (folder / "media.json").write_text(json.dumps(record, indent=1) + "\n")


def load(workdir: pathlib.Path):
  """The saved media of a run as a mixture-like namespace (vocab, codebooks, feature_dim), or None
  when the run folder has none. Raises ValueError (one line) for a damaged folder."""
  folder = pathlib.Path(workdir) / FOLDER
  if not (folder / "media.json").is_file():
    return None
  try:
    record = json.loads((folder / "media.json").read_text())
    with np.load(folder / "codebooks.npz") as z:
      codebooks = {k: z[k] for k in z.files}
    tok = str(folder / record["tokenizer_file"]) if record["tokenizer_file"] else ""
    vocab = Vocab(**{k: record[k] for k in VOCAB_FIELDS},
                  **{k: record[k] for k in LAYOUT_FIELDS if k in record}, tokenizer=tok)
    if tok:
      tokenizer_lib.get(tok, vocab.tokenizer_fingerprint)     # the copy is the model it names
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{folder} is damaged ({type(e).__name__}: {e}); delete it to fall back to "
                     "the data config's folders") from None
  return types.SimpleNamespace(vocab=vocab, codebooks=codebooks,
                               feature_dim=int(record["feature_dim"]))


def info(saved):
  """A data.DatasetInfo of the saved media (what restoring a checkpoint needs)."""
  from omnimoe.data.pipeline.api import DatasetInfo
  return DatasetInfo(saved.vocab, saved.feature_dim)

"""A Hugging Face `tokenizer.json` as omnimoe's text tokenizer (`data.tokenizer=.../tokenizer.json`),
read with the `tokenizers` library, offline.

Its text ids are the Hugging Face token ids, and they stay so in the unified vocabulary
(data/vocab.py `hf_layout`): omnimoe id = Hugging Face id, so an imported model's embedding rows
stay where they are (train/hf_grow.py). `size` is the model's vocabulary when a `config.json` beside
the file says it (`vocab_size`, which may exceed the tokenizer's own ids: Qwen pads its table), else
the tokenizer's, added tokens included.

`specials` names the model's own BOS, EOS and padding ids: `bos_token_id`, `eos_token_id` (the
first, when it is a list) and `pad_token_id` of that `config.json`, else the `bos_token`,
`eos_token` and `pad_token` of a `tokenizer_config.json` beside the file, looked up in the
tokenizer. omnimoe writes BOS and EOS itself where an example begins and ends: the tokenizer never
inserts its special tokens (`add_special_tokens=False`).
"""
import hashlib
import json
import pathlib

import numpy as np


def _read_json(file: pathlib.Path) -> dict:
  """A JSON object file beside the tokenizer ({} when there is none); a corrupt one is a one-line
  TokenizerError naming it (its ids would otherwise be silently missed)."""
  from omnimoe.data.tokenizer import TokenizerError
  if not file.is_file():
    return {}
  try:
    data = json.loads(file.read_text())
  except (OSError, ValueError) as e:
    raise TokenizerError(f"{file}: not readable JSON ({str(e).splitlines()[0]})") from None
  if not isinstance(data, dict):
    raise TokenizerError(f"{file}: expected a JSON object, got {type(data).__name__}")
  return data


class HfTokenizer:
  def __init__(self, path: pathlib.Path, raw: bytes):
    from tokenizers import Tokenizer
    self.path = str(path)
    self.sha256 = hashlib.sha256(raw).hexdigest()
    self.fingerprint = f"hf:{self.sha256[:16]}"
    self._tok = Tokenizer.from_str(raw.decode("utf-8"))
    own = int(self._tok.get_vocab_size(with_added_tokens=True))
    config = _read_json(path.parent / "config.json")
    model_rows = config.get("vocab_size")
    self.size = max(own, int(model_rows or 0))
    self.specials = self._specials(path.parent)

  def _specials(self, folder: pathlib.Path) -> dict:
    """{"bos", "eos", "pad"} -> the model's id or None, from config.json, else tokenizer_config.json."""
    found = dict.fromkeys(("bos", "eos", "pad"))
    sources = [(folder / "config.json", lambda d, k: d.get(f"{k}_token_id")),
               (folder / "tokenizer_config.json", lambda d, k: self._token_id(d.get(f"{k}_token")))]
    for file, read in sources:
      data = _read_json(file)
      for key in found:
        value = read(data, key) if found[key] is None else found[key]
        if isinstance(value, list):
          value = value[0] if value else None
        found[key] = int(value) if isinstance(value, int) and value >= 0 else None
    return found

  def _token_id(self, token) -> int | None:
    if isinstance(token, dict):            # {"content": "<|endoftext|>", ...}
      token = token.get("content")
    return self._tok.token_to_id(token) if isinstance(token, str) else None

  @staticmethod
  def _text(text: str | bytes) -> str:
    return text if isinstance(text, str) else bytes(text).decode("utf-8", errors="replace")

  def encode(self, text: str | bytes) -> np.ndarray:
    return np.asarray(self._tok.encode(self._text(text), add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> bytes:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    return self._tok.decode(ids, skip_special_tokens=False).encode("utf-8")

  def cut(self, text: bytes, max_tokens: int) -> list[bytes]:
    """Pieces of `text`, cut where one of its tokens begins, that each encode to at most
    `max_tokens` tokens on their own and concatenate to the text."""
    from omnimoe.data.tokenizer import TokenizerError
    whole = self._text(text)
    if not whole:
      return []
    starts = sorted({s for s, _ in self._tok.encode(whole, add_special_tokens=False).offsets})
    pieces, begin = [], 0
    while begin < len(whole):
      later = [s for s in starts if s > begin]
      n = max_tokens
      while True:
        end = later[n - 1] if n - 1 < len(later) else len(whole)
        if len(self.encode(whole[begin:end])) <= max_tokens:
          break
        if n == 1:
          raise TokenizerError(f"data.tokenizer '{self.path}': the text at character {begin} "
                               f"needs more than {max_tokens} tokens")
        n -= 1
      pieces.append(whole[begin:end].encode("utf-8"))
      begin = end
    return pieces


def load(path: pathlib.Path) -> HfTokenizer:
  from omnimoe.data.tokenizer import TokenizerError
  try:
    return HfTokenizer(path, path.read_bytes())
  except Exception as e:   # tokenizers raises its own Exception type with the reason
    reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    raise TokenizerError(f"data.tokenizer '{path}' is not a Hugging Face tokenizer.json "
                         f"({reason})") from None

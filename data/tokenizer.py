"""Text tokenizers: UTF-8 bytes (the default), a sentencepiece model or a Hugging Face
`tokenizer.json` (data/hf_tokenizer.py), by `data.tokenizer`.

A tokenizer maps text to text ids 0..size-1; data/vocab.py places them after the specials, so the
unified vocabulary is `[specials | text ids | image codes | audio codes]` whatever the tokenizer.

- `ByteTokenizer`: the 256 byte values; any bytes round-trip exactly.
- `SentencePieceTokenizer`: a sentencepiece `.model` file. Its own specials (unk/bos/eos/pad, if
  the model has them) are ordinary text ids here: omnimoe adds its own BOS/EOS and never asks the
  model for its specials. Models trained by `train` below use byte fallback and no normalization,
  so every text round-trips exactly; a model from elsewhere may normalize (NFKC, whitespace).

Long texts are cut into pieces of at most N tokens (`cut`) such that each piece, encoded on its own,
takes at most N tokens, and the pieces concatenate to the text (cuts fall on character boundaries).

Train a model on your own text, offline:

  python -m omnimoe.data.tokenizer train TEXT_OR_MANIFEST... --vocab 2000 --out runs/tok.model

Inputs ending in `.jsonl` are read as `omnimoe prepare` manifests (their text parts); any other
file is plain UTF-8 text, one paragraph per blank-line-separated block.
"""
import argparse
import functools
import hashlib
import io
import pathlib
import re
import sys
from typing import Iterable, Iterator

import numpy as np

BYTES = "bytes"            # the fingerprint of the byte tokenizer


class TokenizerError(ValueError):
  """A bad tokenizer file or training request; the message is one line."""


class ByteTokenizer:
  size = 256
  fingerprint = BYTES
  path = ""

  def encode(self, text: str | bytes) -> np.ndarray:
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(raw, np.uint8).astype(np.int32)

  def decode(self, ids) -> bytes:
    return np.asarray(ids).astype(np.uint8).tobytes()

  def cut(self, text: bytes, max_tokens: int) -> list[bytes]:
    """Pieces of at most `max_tokens` bytes."""
    return [text[i:i + max_tokens] for i in range(0, len(text), max_tokens)]


class SentencePieceTokenizer:
  def __init__(self, path: pathlib.Path, model: bytes):
    import sentencepiece
    self.path = str(path)
    self.sha256 = hashlib.sha256(model).hexdigest()
    self.fingerprint = f"sentencepiece:{self.sha256[:16]}"
    self._sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    self.size = int(self._sp.get_piece_size())

  @staticmethod
  def _text(text: str | bytes) -> str:
    return text if isinstance(text, str) else bytes(text).decode("utf-8", errors="replace")

  def encode(self, text: str | bytes) -> np.ndarray:
    return np.asarray(self._sp.encode(self._text(text)), np.int32)

  def decode(self, ids) -> bytes:
    return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)]).encode("utf-8")

  def cut(self, text: bytes, max_tokens: int) -> list[bytes]:
    """Pieces of `text` (cut where a token of the whole text begins) that each encode to at most
    `max_tokens` tokens on their own; raises TokenizerError when one character needs more."""
    text = self._text(text).encode("utf-8")   # invalid UTF-8 becomes U+FFFD, as in `encode`
    if not text:
      return []
    proto = self._sp.encode(text.decode("utf-8"), out_type="proto")
    starts = sorted({p.begin for p in proto.pieces
                     if 0 < p.begin < len(text) and (text[p.begin] & 0xC0) != 0x80})  # char starts
    starts = [0, *starts, len(text)]
    pieces, i = [], 0                      # starts[i] is where the next piece begins
    while i < len(starts) - 1:
      j = min(i + max_tokens, len(starts) - 1)
      while True:
        piece = text[starts[i]:starts[j]]
        over = len(self.encode(piece)) - max_tokens
        if over <= 0:
          break
        if j == i + 1:
          raise TokenizerError(f"a piece of {len(piece)} bytes needs {over + max_tokens} tokens, "
                               f"more than {max_tokens}; raise data.seq_len")
        j = max(i + 1, j - over)
      pieces.append(piece)
      i = j
    return pieces


_BYTE = ByteTokenizer()


def load(path: str | pathlib.Path) -> ByteTokenizer | SentencePieceTokenizer:
  """The tokenizer of `data.tokenizer`: "" = bytes, a `*.json` file = a Hugging Face tokenizer,
  else a sentencepiece model file (a relative path is read from the current directory). Raises
  TokenizerError (one line) on a bad file."""
  if not str(path).strip():
    return _BYTE
  given = pathlib.Path(path)
  full = given.absolute()
  if not full.is_file():
    where = "" if given.is_absolute() else " (a relative path is read from the current directory)"
    what = "is not a file" if full.exists() else "does not exist"
    raise TokenizerError(f"data.tokenizer '{full}' {what}{where}; train one with "
                         f"`python -m omnimoe.data.tokenizer train TEXT --vocab N --out {given}`")
  stat = full.stat()
  return _load(full, stat.st_ino, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _load(path: pathlib.Path, inode: int, mtime_ns: int, size: int) -> SentencePieceTokenizer:
  del inode, mtime_ns, size   # cache keys: a model written again is read again
  if path.suffix == ".json":
    from omnimoe.data import hf_tokenizer
    return hf_tokenizer.load(path)
  model = path.read_bytes()
  try:
    return SentencePieceTokenizer(path, model)
  except Exception as e:   # sentencepiece raises RuntimeError/OSError with a multi-line text
    reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    raise TokenizerError(f"data.tokenizer '{path}' is not a sentencepiece model ({reason})") from None


_LOADED: dict = {}   # (path, fingerprint) -> tokenizer, for `get`


def get(path: str, fingerprint: str) -> ByteTokenizer | SentencePieceTokenizer:
  """The tokenizer a Vocab names (looked up once per process, then kept); raises TokenizerError
  when the file no longer holds that model."""
  if fingerprint == BYTES:
    return _BYTE
  tok = _LOADED.get((path, fingerprint))
  if tok is None:
    tok = load(path)
    if tok.fingerprint != fingerprint:
      raise TokenizerError(f"data.tokenizer '{path}' changed on disk ({tok.fingerprint}, was "
                           f"{fingerprint}); restart with the model the run started with")
    _LOADED[path, fingerprint] = tok
  return tok


def describe(fingerprint: str, path: str = "") -> str:
  """`bytes` or `the sentencepiece model <path> (sha256 <prefix>)`, for messages."""
  if fingerprint == BYTES:
    return "byte-level text (data.tokenizer='')"
  if fingerprint.startswith("hf:"):
    return f"the Hugging Face tokenizer '{path}' ({fingerprint})"
  return f"the sentencepiece model '{path}' ({fingerprint})" if path else f"a sentencepiece model ({fingerprint})"


# ---- training a model on the user's own text (offline) ------------------------------------------

def read_texts(paths: Iterable[str | pathlib.Path]) -> Iterator[str]:
  """Paragraphs of plain text files, and the text parts of `.jsonl` manifests."""
  from omnimoe.data.prepare import manifest as manifest_lib
  for path in map(pathlib.Path, paths):
    if not path.is_file():
      raise TokenizerError(f"training text '{path.absolute()}' does not exist")
    if path.suffix == ".jsonl":
      for entry in manifest_lib.read(path):
        if isinstance(entry, manifest_lib.BadLine):
          continue
        text = "".join(p.value for p in entry.parts if p.kind == "text")
        if text.strip():
          yield text
    else:
      try:
        content = path.read_text(encoding="utf-8")
      except UnicodeDecodeError:
        raise TokenizerError(f"training text '{path.absolute()}' is not UTF-8 text") from None
      for paragraph in re.split(r"\n\s*\n", content):
        if paragraph.strip():
          yield paragraph.strip("\n")


def train(texts: Iterable[str], vocab_size: int, out: str | pathlib.Path, *,
          model_type: str = "unigram") -> SentencePieceTokenizer:
  """Trains a sentencepiece model on `texts` and writes it to `out` (no download).

  Byte fallback (any text encodes, no unknown pieces), no normalization and whitespace kept as is,
  so text round-trips exactly; no sentencepiece specials besides `<unk>` (omnimoe has its own).
  `vocab_size` is an upper bound: a small text may give fewer pieces. It must leave room for the
  256 byte pieces and the characters of the text."""
  import sentencepiece
  texts = [t for t in texts if t]
  if not texts:
    raise TokenizerError("no training text (every input was empty)")
  if vocab_size < 260:
    raise TokenizerError(f"--vocab {vocab_size} is too small: the model holds 256 byte pieces plus "
                         f"<unk> and the text's characters; use at least 300")
  buf = io.BytesIO()
  try:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, hard_vocab_limit=False, max_sentence_length=1 << 20,
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, minloglevel=2, num_threads=1)
  except Exception as e:   # e.g. "Vocabulary size is smaller than required_chars"
    reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    raise TokenizerError(f"sentencepiece could not train a {vocab_size}-piece model: {reason}") from None
  out = pathlib.Path(out)
  out.absolute().parent.mkdir(parents=True, exist_ok=True)
  tmp = out.absolute().parent / f".{out.name}.partial"
  tmp.write_bytes(buf.getvalue())
  tmp.replace(out)
  return load(out)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m omnimoe.data.tokenizer",
                              description="Train a sentencepiece model for data.tokenizer.")
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="train a model on text files or prepare manifests (offline)")
  t.add_argument("inputs", nargs="+", metavar="TEXT_OR_MANIFEST",
                 help="plain UTF-8 text files, or .jsonl manifests (their text parts)")
  t.add_argument("--vocab", type=int, required=True, help="number of pieces (an upper bound)")
  t.add_argument("--out", required=True, help="the .model file to write")
  t.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
  ns = p.parse_args(argv)
  try:
    tok = train(read_texts(ns.inputs), ns.vocab, ns.out, model_type=ns.model_type)
  except TokenizerError as e:
    print(f"data.tokenizer: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {ns.out}: {tok.size} pieces ({tok.fingerprint}); use it with "
        f"data.tokenizer={ns.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

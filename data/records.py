"""One record of a prepared dataset, as stored in its ArrayRecord shards.

A record is one example (or one piece of a long text-only example): its parts in order, with the
continuous media vectors, never codebook ids (those are assigned when batches are built, against
the run's codebooks; see data/pipeline/sources.py). Bytes on disk:

  uint32 little-endian header length | UTF-8 JSON header | payload

  header  {"line": 7, "eos": true, "parts": [["text", 11], ["image", 4, 4, 4], ["audio", 30, 24]]}
          text: [kind, bytes]; image: [kind, rows, cols, patch width]; audio: [kind, frames, n_mels];
          video: [kind, tokens, rows, cols, token width, sound frames, n_mels]
  payload each part in order: text as UTF-8 bytes, media as little-endian float32 [M, D] (a video:
          its tokens [tokens * rows * cols, width], then its sound's frames [frames, n_mels])
"""
import dataclasses
import json
import struct

import numpy as np

FLOAT = np.dtype("<f4")


@dataclasses.dataclass(frozen=True, eq=False)
class ImagePart:
  patches_MxD: np.ndarray     # float32 [rows*cols, channels*patch**2]
  grid: tuple[int, int]       # (rows, cols)


@dataclasses.dataclass(frozen=True, eq=False)
class AudioPart:
  frames_MxD: np.ndarray      # float32 [frames, n_mels]


@dataclasses.dataclass(frozen=True, eq=False)
class VideoPart:
  """A clip and its sound; their times are the run's clock (data/video_layout.py)."""
  tokens_UxMxD: np.ndarray    # float32 [tokens, rows*cols, tubelet*channels*patch**2]
  grid: tuple[int, int]       # (rows, cols) of every frame
  sound_AxD: np.ndarray       # float32 [frames, n_mels] (0 frames: a silent clip)


@dataclasses.dataclass(frozen=True, eq=False)
class Record:
  parts: tuple               # each bytes (text), ImagePart or AudioPart, in sequence order
  eos: bool                   # False for a piece cut out of a longer text (more follows)
  line: int                   # the manifest line it came from


def part_tokens(part, text_len=len) -> int:
  """Tokens of one part; `text_len(bytes)` counts a text part's tokens (default: its bytes, i.e.
  byte-level text; with a sentencepiece tokenizer, `lambda t: len(vocab.encode_text(t))`)."""
  if isinstance(part, bytes):
    return text_len(part)
  if isinstance(part, ImagePart):
    return len(part.patches_MxD)
  if isinstance(part, VideoPart):
    return part.tokens_UxMxD.shape[0] * part.tokens_UxMxD.shape[1] + len(part.sound_AxD)
  return len(part.frames_MxD)


def num_tokens(record: Record, text_len=len) -> int:
  """Length of the record's example: BOS, its parts, and EOS when it ends its document."""
  return 1 + sum(part_tokens(p, text_len) for p in record.parts) + int(record.eos)


def encode(record: Record) -> bytes:
  header, payload = [], []
  for part in record.parts:
    if isinstance(part, bytes):
      header.append(["text", len(part)])
      payload.append(part)
    elif isinstance(part, ImagePart):
      header.append(["image", *part.grid, part.patches_MxD.shape[1]])
      payload.append(np.ascontiguousarray(part.patches_MxD, FLOAT).tobytes())
    elif isinstance(part, AudioPart):
      header.append(["audio", *part.frames_MxD.shape])
      payload.append(np.ascontiguousarray(part.frames_MxD, FLOAT).tobytes())
    elif isinstance(part, VideoPart):
      U, M, D = part.tokens_UxMxD.shape
      header.append(["video", U, *part.grid, D, *part.sound_AxD.shape])
      payload.append(np.ascontiguousarray(part.tokens_UxMxD, FLOAT).tobytes())
      payload.append(np.ascontiguousarray(part.sound_AxD, FLOAT).tobytes())
    else:
      raise TypeError(f"not a record part: {type(part).__name__}")
  head = json.dumps({"line": record.line, "eos": record.eos, "parts": header},
                    separators=(",", ":")).encode()
  return struct.pack("<I", len(head)) + head + b"".join(payload)


def decode(raw: bytes) -> Record:
  (n,) = struct.unpack_from("<I", raw)
  head = json.loads(raw[4:4 + n])
  at, parts = 4 + n, []
  for kind, *dims in head["parts"]:
    if kind == "text":
      parts.append(bytes(raw[at:at + dims[0]]))
      at += dims[0]
      continue
    if kind == "video":
      U, rows, cols, width, A, mels = dims
      x = np.frombuffer(raw, FLOAT, U * rows * cols * width, at).astype(np.float32)
      at += x.nbytes
      a = np.frombuffer(raw, FLOAT, A * mels, at).astype(np.float32)
      at += a.nbytes
      parts.append(VideoPart(x.reshape(U, rows * cols, width), (rows, cols), a.reshape(A, mels)))
      continue
    rows, cols, width = dims if kind == "image" else (dims[0], 1, dims[1])
    count = rows * cols
    x = np.frombuffer(raw, FLOAT, count * width, at).reshape(count, width).astype(np.float32)
    at += x.nbytes
    parts.append(ImagePart(x, (rows, cols)) if kind == "image" else AudioPart(x))
  if at != len(raw):
    raise ValueError(f"record of {len(raw)} bytes has {len(raw) - at} bytes past its parts")
  return Record(tuple(parts), bool(head["eos"]), int(head["line"]))

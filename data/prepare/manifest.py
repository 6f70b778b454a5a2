"""The manifest of `omnimoe prepare`: JSON Lines, one example a line, its parts in order.

  {"parts": [{"text": "a cat"}, {"image": "cat.png"}, {"audio": "meow.wav"}, {"text": "..."}]}
  [{"image": "cat.png"}, {"text": "a cat"}]     a bare list of parts: the same as {"parts": [...]}
  {"text": "plain text"}                         shorthand: one text part
  {"image": "a.png", "text": "caption"}          shorthand: the media first, then the text
  {"audio": "b.wav", "text": "transcript"}       (with both: image, audio, text)
  {"image": "a.png", "text": "caption", "split": "heldout"}   any line: pin its split
  {"video": "clip.gif", "sound": "clip.wav", "text": "..."}   a clip and its sound track (optional)
  {"parts": [{"video": "clip.gif", "sound": "clip.wav"}, {"text": "..."}]}   the same

Paths are relative to the manifest's folder (absolute paths work too). Blank lines are skipped.
`"split"` ("train" or "heldout"), next to `parts` or the shorthand keys, pins which share of the
prepared folder the example goes to; without it `omnimoe prepare` draws the split (data/prepare/write.py).
Any other key, a split that is not one of those two words, a part that is not exactly one of
text/image/audio/video (a video part may add "sound"), or an example with no media and no text is
a bad line. A line has at most one video; its "sound" is that video's sound track, laid out with it
on one clock (data/video_layout.py).
"""
import dataclasses
import json
import pathlib
from typing import Iterator

KINDS = ("text", "image", "audio", "video")
SHORTHAND_ORDER = ("image", "audio", "video", "text")
SOUND_KEY = "sound"
SPLIT_KEY = "split"
SPLITS = ("train", "heldout")


@dataclasses.dataclass(frozen=True)
class Part:
  kind: str                   # "text", "image", "audio" or "video"
  value: str                  # the text, or the media path as written in the manifest
  sound: str | None = None    # a video's sound track (path as written), if it has one


@dataclasses.dataclass(frozen=True)
class Entry:
  line: int                   # 1-based line number in the manifest
  parts: tuple[Part, ...]
  split: str | None = None    # "train" / "heldout" when the line pins it, else None (drawn)


class BadLine(ValueError):
  """One bad example: `line` of the manifest, the media `path` at fault (or None), the reason."""

  def __init__(self, line: int, reason: str, path: str | None = None):
    super().__init__(reason)
    self.line, self.reason, self.path = line, reason, path


def _split(line: int, obj: dict) -> str | None:
  if SPLIT_KEY not in obj:
    return None
  value = obj[SPLIT_KEY]
  if value not in SPLITS:
    shown = json.dumps(value, ensure_ascii=False)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    raise BadLine(line, f"'split' must be \"train\" or \"heldout\", got {shown}")
  return value


def _parts(line: int, obj: dict) -> tuple[Part, ...]:
  obj = {k: v for k, v in obj.items() if k != SPLIT_KEY}
  if "parts" in obj:
    if set(obj) != {"parts"}:
      extra = sorted(set(obj) - {"parts"})[0]
      raise BadLine(line, f"unknown key '{extra}' next to 'parts'")
    raw = obj["parts"]
    if not isinstance(raw, list):
      raise BadLine(line, "'parts' must be a list")
    parts = []
    for i, part in enumerate(raw, start=1):
      if isinstance(part, dict) and "video" in part and set(part) <= {"video", SOUND_KEY}:
        parts.append(_video(line, part))
        continue
      if not isinstance(part, dict) or len(part) != 1 or next(iter(part)) not in KINDS:
        raise BadLine(line, f"part {i} must be one of {{\"text\": ...}}, {{\"image\": ...}}, "
                            f"{{\"audio\": ...}}, {{\"video\": ..., \"sound\": ...}}")
      (kind, value), = part.items()
      parts.append(_part(line, kind, value))
  else:
    unknown = sorted(set(obj) - set(KINDS) - ({SOUND_KEY} if "video" in obj else set()))
    if unknown:
      raise BadLine(line, f"unknown key '{unknown[0]}' (expected 'parts', or 'text'/'image'/'audio'/"
                          f"'video' ('sound' with 'video'); 'split' may go with either)")
    parts = [_video(line, obj) if kind == "video" else _part(line, kind, obj[kind])
             for kind in SHORTHAND_ORDER if kind in obj]
  if sum(p.kind == "video" for p in parts) > 1:
    raise BadLine(line, "more than one video in one example")
  if not any(p.kind != "text" or p.value for p in parts):
    raise BadLine(line, "empty example (no media and no text)")
  return tuple(parts)


def _part(line: int, kind: str, value) -> Part:
  if not isinstance(value, str):
    raise BadLine(line, f"the value of '{kind}' must be a string, got {type(value).__name__}")
  if kind != "text" and not value:
    raise BadLine(line, f"empty {kind} path")
  return Part(kind, value)


def _video(line: int, obj: dict) -> Part:
  video = _part(line, "video", obj["video"])
  if SOUND_KEY not in obj:
    return video
  sound = _part(line, "audio", obj[SOUND_KEY])
  return Part("video", video.value, sound.value)


def parse_line(line: int, text: str) -> Entry:
  """One manifest line -> Entry; raises BadLine."""
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise BadLine(line, f"not valid JSON ({e.msg} at column {e.colno})") from None
  if isinstance(obj, list):   # a bare list of parts (it cannot pin a split)
    obj = {"parts": obj}
  if not isinstance(obj, dict):
    raise BadLine(line, "a line must be a JSON object or a list of parts")
  return Entry(line, _parts(line, obj), _split(line, obj))


def read(path: str | pathlib.Path) -> Iterator[Entry | BadLine]:
  """Every non-blank line, parsed; a bad line is yielded (not raised) so a caller may skip it."""
  with open(path, encoding="utf-8", errors="strict") as f:
    line = 0
    while True:
      try:
        text = f.readline()
      except UnicodeDecodeError:
        yield BadLine(line + 1, "not UTF-8 text")
        return   # the file position is lost; nothing after it can be trusted
      if not text:
        return
      line += 1
      if not text.strip():
        continue
      try:
        yield parse_line(line, text)
      except BadLine as e:
        yield e


def count_examples(path: str | pathlib.Path) -> int:
  """Non-blank lines: the examples the manifest names, before any is decoded."""
  with open(path, "rb") as f:
    return sum(1 for text in f if text.strip())


def resolve(manifest: str | pathlib.Path, media_path: str) -> pathlib.Path:
  """A media path as written in the manifest -> a path on disk (relative to the manifest's folder)."""
  return pathlib.Path(manifest).absolute().parent / media_path

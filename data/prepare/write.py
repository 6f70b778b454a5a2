"""`omnimoe prepare`: a JSONL manifest of text, image and audio files -> a prepared folder.

  DIR/records-00000-of-00002.array_record ...  one record per example (data/records.py), group_size:1
  DIR/index.npz      lengths int32 [N]: tokens of each record's example; heldout bool [N]
  DIR/codebooks.npz  k-means codebooks over the training records: image float32 [image_codebook,
                     channels*patch**2], audio float32 [audio_codebook, n_mels] (a video's sound
                     included) and video float32 [video_codebook, token width] (those present)
  DIR/card.json      the dataset card: counts, token totals, the data config it was prepared with,
                     and every skipped line with its reason

Never half-written: everything goes to a hidden folder beside DIR (`.DIR.partial-PID`) that is
renamed to DIR only when complete; on any error it is removed and DIR is left as it was (a DIR that
is not a prepared folder is never replaced). A run that was killed outright (SIGKILL, power loss)
leaves its `.DIR.partial-PID` (or, killed mid-swap, `.DIR.old-PID`) behind: the next prepare of DIR
removes those whose process PID is no longer running on this machine.

Rules:
- Held-out: round(heldout_fraction * examples) manifest examples (at least 1 and at most all but one
  when there are two or more), drawn with a fixed seed from the non-blank lines, go to the held-out
  share (eval/loss); a skipped line leaves the split a little smaller. A line with `"split":
  "train"` or `"heldout"` (data/manifest.py) goes where it says instead: the draw is still made over
  all lines, so the lines without the key keep their draw, and the card counts the pinned lines
  (`split_pinned`). Pinning every line makes the split exactly the manifest's.
- An example with media must fit in `data.seq_len` tokens whole ([BOS] parts [EOS]); a text-only
  example longer than that is cut into pieces of at most seq_len - 2 text tokens (EOS only on the
  last), like the default dataset's text stream. Empty text parts are dropped.
- Text is stored as UTF-8 bytes, but lengths (index.npz) and cuts count tokens of the tokenizer of
  `data.tokenizer` (bytes by default); the card records which (`prepared_with.tokenizer`, a
  fingerprint), and a run must use the same tokenizer to read the folder.
- Bad input (bad JSON, unknown keys, missing or corrupt file, unreadable WAV, an empty example, an
  example that does not fit) raises BadData naming the manifest line and the path; with
  `skip_bad=True` the line is skipped and listed in the card.
"""
import dataclasses
import json
import os
import pathlib
import shutil

import numpy as np
from array_record.python import array_record_module

from omnimoe.data.prepare import audio_io
from omnimoe.data.prepare import image_io
from omnimoe.data.prepare import video_io
from omnimoe.data.prepare.tally import Tally, kind_of
from omnimoe.data.prepare import kmeans, temp_folders
from omnimoe.data.prepare import manifest as manifest_lib
from omnimoe.data import records as records_lib
from omnimoe.data import tokenizer as tokenizer_lib
from omnimoe.data import video_layout
from omnimoe.data.config import DataConfig, image_patch_dim, video_patch_dim

FORMAT = "omnimoe.prepared.v1"
RECORDS_PER_SHARD = 4096
WRITER_OPTIONS = "group_size:1"       # one record per chunk: fastest random access
SPLIT_SEED = 31337
CODEBOOK_SEED = 4242
KMEANS_SAMPLE = 65536                 # vectors kept (reservoir sample) to fit each codebook
# The data keys a prepared folder depends on; a run must agree with them (data/sources.py).
PREPARED_KEYS = ("image_patch", "image_side", "image_channels", "sample_rate", "n_mels",
                 "frame_len", "frame_hop", "image_codebook", "audio_codebook")
# ... and, for a folder that holds video, these too (folders from before video lack them).
VIDEO_KEYS = ("video_side", "video_patch", "video_tubelet", "video_fps", "video_frames",
              "video_codebook")
MEDIA_KINDS = ("image", "audio", "video")


class BadData(ValueError):
  """A bad manifest line (exit code 3); the message is one line: manifest:line: path: reason."""


class PrepareError(ValueError):
  """A usage problem (exit code 2): missing manifest, an --out that is not a prepared folder."""


def check_config(cfg: DataConfig) -> None:
  """Raises ValueError naming the key when these data settings cannot prepare anything."""
  image_io.check_layout(cfg)
  for name in ("seq_len", "image_codebook", "audio_codebook", "sample_rate", "n_mels", "frame_len",
               "frame_hop"):
    if getattr(cfg, name) <= 0:
      raise ValueError(f"data.{name} must be positive, got {getattr(cfg, name)}")
  if not 0 < cfg.heldout_fraction < 1:
    raise ValueError(f"data.heldout_fraction must lie in (0, 1), got {cfg.heldout_fraction}")
  for key, why in video_layout.config_problems(cfg):
    raise ValueError(f"{key} {why}")
  rows, cols = image_io.grid(cfg)
  if 2 + rows * cols > cfg.seq_len:
    raise ValueError(f"an image is {rows * cols} patches, more than data.seq_len={cfg.seq_len} "
                     f"holds; raise data.seq_len or data.image_patch, or lower data.image_side")


def is_prepared(folder: pathlib.Path) -> bool:
  return (folder / "card.json").is_file()


def _heldout_ordinals(n: int, fraction: float) -> set[int]:
  if n < 2:
    return set()
  count = min(n - 1, max(1, round(fraction * n)))
  return set(np.random.default_rng(SPLIT_SEED).choice(n, size=count, replace=False).tolist())


class _Reservoir:
  """A uniform sample of at most `cap` vectors out of all vectors added (Algorithm R, vectorized)."""

  def __init__(self, cap: int, seed: int):
    self.cap, self.seen, self.rng, self.data = cap, 0, np.random.default_rng(seed), None

  def add(self, x_NxD: np.ndarray) -> None:
    if self.data is None:
      self.data = np.empty((self.cap, x_NxD.shape[1]), np.float32)
    fill = max(0, min(len(x_NxD), self.cap - self.seen))
    self.data[self.seen:self.seen + fill] = x_NxD[:fill]
    rest = x_NxD[fill:]
    if len(rest):
      slot = self.rng.integers(0, self.seen + fill + np.arange(len(rest)) + 1)
      keep = slot < self.cap
      self.data[slot[keep]] = rest[keep]   # repeated slots: the later vector wins, as in sequence
    self.seen += len(x_NxD)

  def sample(self) -> np.ndarray | None:
    return None if self.data is None else self.data[:min(self.seen, self.cap)]


class _ShardWriter:
  def __init__(self, folder: pathlib.Path, per_shard: int):
    self.folder, self.per_shard = folder, per_shard
    self.paths: list[pathlib.Path] = []
    self.count, self._writer = 0, None

  def write(self, raw: bytes) -> None:
    if self._writer is None or self.count % self.per_shard == 0:
      self._close_shard()
      self.paths.append(self.folder / f"records-{len(self.paths):05d}.array_record")
      self._writer = array_record_module.ArrayRecordWriter(str(self.paths[-1]), WRITER_OPTIONS)
    self._writer.write(raw)
    self.count += 1

  def _close_shard(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def finish(self) -> list[str]:
    """Closes the last shard and names every shard `records-IIIII-of-NNNNN.array_record`."""
    self._close_shard()
    names = []
    for i, path in enumerate(self.paths):
      name = f"records-{i:05d}-of-{len(self.paths):05d}.array_record"
      path.rename(self.folder / name)
      names.append(name)
    return names


def _decode_entry(entry: manifest_lib.Entry, manifest: pathlib.Path, cfg: DataConfig,
                  tok=tokenizer_lib.ByteTokenizer()) -> list[records_lib.Record]:
  """One manifest example -> its record(s); raises BadLine naming the file at fault."""
  parts, first_media = [], None
  for part in entry.parts:
    if part.kind == "text":
      if part.value:
        parts.append(part.value.encode("utf-8"))
      continue
    first_media = first_media or part.value
    path = manifest_lib.resolve(manifest, part.value)
    try:
      if part.kind == "image":
        parts.append(records_lib.ImagePart(image_io.load_patches(path, cfg), image_io.grid(cfg)))
      elif part.kind == "video":
        parts.append(_video_part(manifest, part, cfg))
      else:
        parts.append(records_lib.AudioPart(audio_io.load_frames(path, cfg)))
    except image_io.MediaError as e:
      raise manifest_lib.BadLine(entry.line, str(e), part.value) from None
  if first_media is None:   # text only: cut like the default text stream
    try:
      pieces = tok.cut(b"".join(parts), cfg.seq_len - 2)
    except tokenizer_lib.TokenizerError as e:
      raise manifest_lib.BadLine(entry.line, str(e)) from None
    return [records_lib.Record((piece,), i == len(pieces) - 1, entry.line)
            for i, piece in enumerate(pieces)]
  record = records_lib.Record(tuple(parts), True, entry.line)
  n = records_lib.num_tokens(record, _text_len(tok))
  if n > cfg.seq_len:
    raise manifest_lib.BadLine(entry.line, f"example needs {n} tokens, more than data.seq_len="
                               f"{cfg.seq_len}; shorten it or raise data.seq_len", first_media)
  return [record]


def _video_part(manifest: pathlib.Path, part, cfg: DataConfig) -> records_lib.VideoPart:
  tokens = video_io.tokens(video_io.load_frames(manifest_lib.resolve(manifest, part.value), cfg),
                           cfg)
  if part.sound is None:    # the file's own sound track, if it has one
    sound = video_io.own_sound_frames(manifest_lib.resolve(manifest, part.value), len(tokens), cfg)
  else:
    try:
      sound = video_io.sound_frames(manifest_lib.resolve(manifest, part.sound), len(tokens), cfg)
    except image_io.MediaError as e:   # name the sound file, not the video
      raise image_io.MediaError(f"{part.sound}: {e}") from None
  return records_lib.VideoPart(tokens, video_io.grid(cfg), sound)


def _one_line(manifest: pathlib.Path, bad: manifest_lib.BadLine) -> str:
  where = f"{manifest}:{bad.line}: " + (f"{bad.path}: " if bad.path else "")
  return (where + bad.reason).replace("\n", " ")


def _text_len(tok):
  """Tokens of a text part under `tok` (bytes: its length)."""
  return len if isinstance(tok, tokenizer_lib.ByteTokenizer) else (lambda t: len(tok.encode(t)))


def prepare(manifest: str | pathlib.Path, out: str | pathlib.Path, cfg: DataConfig, *,
            skip_bad: bool = False, records_per_shard: int = RECORDS_PER_SHARD) -> dict:
  """Writes the prepared folder `out` from `manifest`; returns the dataset card."""
  manifest, out = pathlib.Path(manifest), pathlib.Path(out)
  check_config(cfg)
  tokenizer_lib.load(cfg.tokenizer)   # a bad data.tokenizer: TokenizerError (a ValueError)
  if not manifest.is_file():
    raise PrepareError(f"manifest '{manifest}' does not exist")
  if out.exists() and not is_prepared(out):
    raise PrepareError(f"--out '{out}' exists and is not a prepared folder; remove it or choose "
                       f"another")
  out.absolute().parent.mkdir(parents=True, exist_ok=True)
  temp_folders.remove_stale(out)
  tmp = temp_folders.name(out, "partial", os.getpid())
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    card = _write(manifest, tmp, cfg, skip_bad, records_per_shard)
    if out.exists():   # a previous prepared folder: swap, then drop the old one
      old = temp_folders.name(out, "old", os.getpid())
      out.rename(old)
      tmp.rename(out)
      shutil.rmtree(old)
    else:
      tmp.rename(out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return card


@dataclasses.dataclass
class _Written:
  """What writing the records of one manifest gathered, for the index, codebooks and card."""
  shards: list[str]
  lengths: list[int]                  # tokens of each record's example
  is_heldout: list[bool]
  skipped: list[dict]                 # {"line", "path", "reason"} of each skipped line
  pinned: dict                        # examples whose line pins its split, by split
  tally: Tally
  samples: dict                       # (kind, split) -> _Reservoir of media vectors


def _write_records(manifest: pathlib.Path, folder: pathlib.Path, cfg: DataConfig, tok,
                   skip_bad: bool, records_per_shard: int) -> _Written:
  heldout = _heldout_ordinals(manifest_lib.count_examples(manifest), cfg.heldout_fraction)
  text_len = _text_len(tok)
  writer = _ShardWriter(folder, records_per_shard)
  out = _Written([], [], [], [], {"train": 0, "heldout": 0}, Tally(text_len),
                 {(kind, split): _Reservoir(KMEANS_SAMPLE, CODEBOOK_SEED)
                  for kind in MEDIA_KINDS for split in ("train", "heldout")})
  for ordinal, entry in enumerate(manifest_lib.read(manifest)):
    try:
      if isinstance(entry, manifest_lib.BadLine):
        raise entry
      recs = _decode_entry(entry, manifest, cfg, tok)
    except manifest_lib.BadLine as bad:
      if not skip_bad:
        raise BadData(_one_line(manifest, bad)) from None
      out.skipped.append({"line": bad.line, "path": bad.path, "reason": bad.reason})
      continue
    split = entry.split or ("heldout" if ordinal in heldout else "train")
    out.pinned[split] += bool(entry.split)
    out.tally.add(recs, split)
    for rec in recs:
      writer.write(records_lib.encode(rec))
      out.lengths.append(records_lib.num_tokens(rec, text_len))
      out.is_heldout.append(split == "heldout")
      for part in rec.parts:
        if not isinstance(part, bytes):
          kind = kind_of(part)
          if kind == "video":
            out.samples[kind, split].add(part.tokens_UxMxD.reshape(-1, part.tokens_UxMxD.shape[2]))
            if len(part.sound_AxD):
              out.samples["audio", split].add(part.sound_AxD)
            continue
          out.samples[kind, split].add(part.patches_MxD if kind == "image" else part.frames_MxD)
  out.shards = writer.finish()
  return out


def _fit_codebooks(w: _Written, sizes: dict) -> dict:
  """k-means per modality over the training records' vectors (the held-out ones when every
  example with that modality is held out)."""
  codebooks = {}
  for kind in MEDIA_KINDS:
    x = w.samples[kind, "train"].sample()
    x = w.samples[kind, "heldout"].sample() if x is None else x
    if x is not None:
      codebooks[kind] = kmeans.fit(x, sizes[kind], CODEBOOK_SEED)
  return codebooks


def _card(manifest: pathlib.Path, cfg: DataConfig, tok, w: _Written, sizes: dict,
          codebooks: dict) -> dict:
  tally = w.tally
  return {
      "format": FORMAT,
      "manifest": str(manifest.absolute()),
      "prepared_with": {"seq_len": cfg.seq_len, "heldout_fraction": cfg.heldout_fraction,
                        **{k: getattr(cfg, k) for k in PREPARED_KEYS + VIDEO_KEYS},
                        "video_max_seconds": cfg.video_max_seconds,
                        "tokenizer": tok.fingerprint, "tokenizer_path": tok.path,
                        "text_tokens": tok.size},
      "feature_widths": {"image": image_patch_dim(cfg), "audio": cfg.n_mels,
                         "video": video_patch_dim(cfg)},
      "examples": tally.examples,
      "split_pinned": w.pinned,
      "examples_with": tally.with_modality,
      "media": tally.media,
      "records": {"total": len(w.lengths), **tally.records},
      "tokens": {**tally.tokens, "total": int(sum(w.lengths))},
      "text_bytes": tally.text_bytes,
      "longest_record_tokens": tally.longest,
      "codebooks": {kind: (sizes[kind] if kind in codebooks else None) for kind in sizes},
      "shards": w.shards,
      "skipped": {"count": len(w.skipped), "lines": w.skipped},
  }


def _write(manifest: pathlib.Path, folder: pathlib.Path, cfg: DataConfig, skip_bad: bool,
           records_per_shard: int) -> dict:
  tok = tokenizer_lib.load(cfg.tokenizer)
  w = _write_records(manifest, folder, cfg, tok, skip_bad, records_per_shard)
  if not w.lengths:
    raise BadData(f"{manifest}: no usable example" +
                  (f" ({len(w.skipped)} skipped)" if w.skipped else ""))
  sizes = {"image": cfg.image_codebook, "audio": cfg.audio_codebook, "video": cfg.video_codebook}
  codebooks = _fit_codebooks(w, sizes)
  np.savez(folder / "codebooks.npz", **codebooks)
  np.savez(folder / "index.npz", lengths=np.asarray(w.lengths, np.int32),
           heldout=np.asarray(w.is_heldout, bool))
  card = _card(manifest, cfg, tok, w, sizes, codebooks)
  (folder / "card.json").write_text(json.dumps(card, indent=1) + "\n")
  return card


def summary(card: dict, out: str | pathlib.Path) -> str:
  """The line `omnimoe prepare` prints when it is done."""
  ex, tok, media = card["examples"], card["tokens"], card["media"]
  text = (f"{tok['text']} text bytes" if card["prepared_with"].get("tokenizer", "bytes") == "bytes"
          else f"{tok['text']} text tokens ({card.get('text_bytes', '?')} bytes)")
  line = (f"prepared {ex['total']} examples ({ex['train']} train, {ex['heldout']} held out) into "
          f"{out}: {media['image']} images, {media['audio']} audio clips, "
          f"{media.get('video', 0)} videos, {text}, "
          f"{tok['total']} tokens")
  if card["skipped"]["count"]:
    line += f"; skipped {card['skipped']['count']} bad lines (listed in {out}/card.json)"
  return line

"""The built-in default dataset as three prepared folders, built once per data config and cached.

  folders = cache.ensure(cfg)   # [(images, 0.7), (tones, 0.15), (text, 0.15)]
                                # + (clips, data.weight_video) when that is positive

`ensure` writes the default dataset's files (data/builtin/files.py, by kind) into a private
temporary folder, prepares each kind with `omnimoe prepare`'s code and the run's data settings,
and renames the result into the cache:

  CACHE/default-prepared/KEY/{images,tones,text}/   three prepared folders (data/prepare/write.py)
  CACHE/default-prepared/KEY/clips/                  with data.weight_video > 0: the built-in
                                                     clips (data/builtin/clip_files.py)
  CACHE/default-prepared/KEY/build.json              what KEY is the hash of

CACHE is `cache_dir`, else $OMNIMOE_CACHE, else ~/.cache/omnimoe. KEY hashes everything the files
depend on: the data keys that prepare and the file writer read (`BUILD_KEYS`), the tokenizer's path
and file content, the tones per digit, the text corpus and `VERSION` (bumped when the synthesis or
the file layout changes); with clips, the video keys (`write.VIDEO_KEYS`) and the clip count too
(a run without video keeps the key it had before video existed).

Safe when several processes (hosts of one machine) call it at once: each builds in its own
`.KEY.partial-PID-THREAD` folder and renames it to KEY only when complete; a build that finds KEY
already there discards its own and uses KEY. So a KEY folder is always complete; one that is not
(changed by hand) is refused, never used. Temporary folders of killed builds are removed by the
next build of the same KEY.
"""
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import sys
import threading

from omnimoe.data.builtin import captions, dtmf
from omnimoe.data.builtin import clip_files, clips as clips_lib
from omnimoe.data.builtin import files
from omnimoe.data.prepare import image_io, temp_folders
from omnimoe.data.prepare import write as prepare
from omnimoe.data.builtin import text_corpus
from omnimoe.data import tokenizer as tokenizer_lib
from omnimoe.data.config import DataConfig

VERSION = 1                  # bump when the synthesis, the captions or the file layout change
CACHE_ENV = "OMNIMOE_CACHE"
SUBFOLDER = "default-prepared"
BUILD_FILE = "build.json"
# The data keys the written files and the prepared folders depend on (the rest keep their defaults
# in the build, so nothing else can change the output).
BUILD_KEYS = prepare.PREPARED_KEYS + ("seq_len", "heldout_fraction", "tone_seconds", "tokenizer")
FOLDERS = tuple(name for _, name in files.KINDS)   # images, tones, text
CLIPS_FOLDER = "clips"                             # with data.weight_video > 0


def folders(cfg: DataConfig) -> tuple[str, ...]:
  """The prepared folders of the built-in dataset for these settings."""
  return FOLDERS + ((CLIPS_FOLDER,) if cfg.weight_video > 0 else ())


def cache_root(cache_dir: pathlib.Path | None = None) -> pathlib.Path:
  """cache_dir, else $OMNIMOE_CACHE, else ~/.cache/omnimoe."""
  if cache_dir is not None:
    return pathlib.Path(cache_dir)
  env = os.environ.get(CACHE_ENV, "").strip()
  return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "omnimoe"


def build_inputs(cfg: DataConfig, tones_per_digit: int, limit: int | None) -> dict:
  """Everything the built folders depend on (JSON); the cache key is its hash."""
  tok = tokenizer_lib.load(cfg.tokenizer)
  corpus = hashlib.sha256(b"\0".join(text_corpus.documents())).hexdigest()
  inputs = {"version": VERSION, "data": {k: getattr(cfg, k) for k in BUILD_KEYS if k != "tokenizer"},
            "tokenizer": {"path": tok.path, "sha256": getattr(tok, "sha256", None)},
            "tones_per_digit": tones_per_digit, "limit": limit, "text_corpus_sha256": corpus}
  if cfg.weight_video > 0:
    inputs["video"] = {**{k: getattr(cfg, k) for k in prepare.VIDEO_KEYS},
                       "clips": _num_clips(cfg, limit), "clips_version": CLIPS_VERSION,
                       "clips_source_sha256": _clips_source()}
  return inputs


CLIPS_VERSION = 3            # the clips' format; their synthesis is keyed by its source (below)


def _clips_source() -> str:
  """sha256 of the code that draws and writes the built-in clips: any change to it is a new cache
  folder (a hand-kept version number was once forgotten, and runs read clips of the old code)."""
  return hashlib.sha256(b"".join(pathlib.Path(m.__file__).read_bytes()
                                 for m in (clips_lib, clip_files))).hexdigest()


def _num_clips(cfg: DataConfig, limit: int | None) -> int:
  return cfg.video_clips if limit is None else max(2, min(limit, cfg.video_clips))


def cache_key(inputs: dict) -> str:
  return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def check(cfg: DataConfig) -> None:
  """Raises ValueError naming the key when these settings cannot build the default dataset."""
  prepare.check_config(cfg)
  weights = _weights(cfg)
  if min(weights) < 0 or sum(weights) <= 0:
    raise ValueError(f"data.weight_image/audio/text/video must be >= 0 with a positive sum, got "
                     f"{weights}")
  if cfg.weight_video > 0:
    _check_clips(cfg)
  if cfg.image_shift < 0:
    raise ValueError(f"data.image_shift must be >= 0, got {cfg.image_shift}")
  if not 0 <= cfg.caption_first <= 1:
    raise ValueError(f"data.caption_first must be in [0, 1], got {cfg.caption_first}")
  media = max(image_io.grid(cfg)[0] * image_io.grid(cfg)[1], dtmf.num_frames(cfg))
  tok = tokenizer_lib.load(cfg.tokenizer)
  caption = max(len(tok.encode(captions.render(template, d)))
                for templates in (captions.IMAGE_TEMPLATES, captions.AUDIO_TEMPLATES)
                for template, _ in templates for d in range(len(captions.WORDS)))
  if 2 + media + caption > cfg.seq_len:
    raise ValueError(f"data.seq_len={cfg.seq_len} is shorter than the longest image/tone example "
                     f"of the default dataset ({2 + media + caption} tokens); raise it or use a "
                     f"larger data.image_patch")


def _check_clips(cfg: DataConfig) -> None:
  """Raises ValueError when a built-in clip cannot be drawn or does not fit in data.seq_len."""
  clips_lib.check(cfg.video_side, cfg.video_frames)
  if cfg.video_clips < 2:
    raise ValueError(f"data.video_clips must be >= 2 (training and held-out clips), got "
                     f"{cfg.video_clips}")
  if abs(1000.0 / cfg.video_fps - round(1000.0 / cfg.video_fps)) > 1e-9:
    raise ValueError(f"data.video_fps={cfg.video_fps}: the built-in clips are GIFs, whose frames "
                     f"last whole milliseconds (1000 / fps must be a whole number)")
  units = -(-cfg.video_frames // cfg.video_tubelet)
  side = cfg.video_side // cfg.video_patch
  seconds = cfg.video_frames / cfg.video_fps
  samples = int(round(seconds * cfg.sample_rate))
  sound = 1 + (samples - cfg.frame_len) // cfg.frame_hop if samples >= cfg.frame_len else 0
  sound = min(sound, -(-samples // cfg.frame_hop))
  caption = max(len(clips_lib.motion_caption(d, w)) for d in range(10) for w in clips_lib.DIRECTIONS)
  need = 2 + units * side * side + sound + caption
  if need > cfg.seq_len:
    raise ValueError(f"data.seq_len={cfg.seq_len} is shorter than a built-in clip example ({need} "
                     f"tokens); raise it, or lower data.video_frames / raise data.video_patch")


def path(cfg: DataConfig, name: str, cache_dir: pathlib.Path | None = None) -> pathlib.Path:
  """The prepared folder `name` (one of `folders(cfg)`: images, tones, text, clips), built on
  first use."""
  if name not in folders(cfg):
    raise ValueError(f"the default dataset has no folder {name!r}; it has "
                     f"{', '.join(folders(cfg))}")
  return dict((p.name, p) for p, _ in ensure(cfg, cache_dir))[name]


def _weights(cfg: DataConfig) -> tuple[float, ...]:
  return (cfg.weight_image, cfg.weight_audio, cfg.weight_text) + (
      (cfg.weight_video,) if cfg.weight_video > 0 else ())


def ensure(cfg: DataConfig, cache_dir: pathlib.Path | None = None, *,
           tones_per_digit: int = files.TONES_PER_DIGIT,
           limit: int | None = None) -> list[tuple[pathlib.Path, float]]:
  """[(images folder, cfg.weight_image), (tones, cfg.weight_audio), (text, cfg.weight_text)],
  built on first use (see the module docstring). `limit`: only the first N images and text
  documents (quick tests). Raises ValueError (one line) for bad settings or a broken cache
  folder."""
  check(cfg)
  inputs = build_inputs(cfg, tones_per_digit, limit)
  final = cache_root(cache_dir) / SUBFOLDER / cache_key(inputs)
  if not final.exists():
    seconds = 10 + (inputs["video"]["clips"] * 2.4e-3 if "video" in inputs else 0)  # measured
    print(f"omnimoe: preparing the default dataset into {final} (once per data config, about "
          f"{seconds:.0f} s)", file=sys.stderr)
    _build(cfg, inputs, final, tones_per_digit, limit)
  _check_complete(final, inputs)
  return [(final / name, w) for name, w in zip(folders(cfg), _weights(cfg))]


def _check_complete(final: pathlib.Path, inputs: dict) -> None:
  names = FOLDERS + ((CLIPS_FOLDER,) if "video" in inputs else ())
  missing = [name for name in names if not prepare.is_prepared(final / name)]
  try:
    recorded = json.loads((final / BUILD_FILE).read_text())
  except (OSError, ValueError):
    recorded = None
  if missing or recorded != json.loads(json.dumps(inputs)):
    why = f"missing {', '.join(missing)}" if missing else f"{BUILD_FILE} does not match"
    raise ValueError(f"cache folder '{final}' is incomplete or changed ({why}); remove it and "
                     f"run again")


def _build(cfg: DataConfig, inputs: dict, final: pathlib.Path, tones_per_digit: int,
           limit: int | None) -> None:
  """Builds into a private temporary folder beside `final` and renames it to `final`, unless
  another build got there first (then this one is discarded)."""
  # Only the keys in the hash reach the build; an absolute tokenizer path does not depend on the
  # current directory (the file's content is in the hash).
  build_cfg = DataConfig(**{k: getattr(cfg, k) for k in BUILD_KEYS + prepare.VIDEO_KEYS})
  if inputs["tokenizer"]["path"]:
    build_cfg = dataclasses.replace(build_cfg, tokenizer=inputs["tokenizer"]["path"])
  final.parent.mkdir(parents=True, exist_ok=True)
  temp_folders.remove_stale(final)
  tmp = final.parent / f".{final.name}.partial-{os.getpid()}-{threading.get_ident()}"
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    files.write_default_manifest(tmp / "files", tones_per_digit=tones_per_digit,
                                            limit=limit, by_kind=True, cfg=build_cfg)
    for name in FOLDERS:
      prepare.prepare(tmp / "files" / f"{name}.jsonl", tmp / name, build_cfg)
    if "video" in inputs:
      manifest = clip_files.write_clips(tmp / "files", build_cfg, clips=inputs["video"]["clips"])
      prepare.prepare(manifest, tmp / CLIPS_FOLDER, build_cfg)
    shutil.rmtree(tmp / "files")
    (tmp / BUILD_FILE).write_text(json.dumps(inputs, indent=1, sort_keys=True) + "\n")
    try:
      tmp.rename(final)         # atomic; fails when another build renamed its folder first
    except OSError:
      if not final.exists():
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)

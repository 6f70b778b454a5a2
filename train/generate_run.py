"""`omnimoe generate`: a run's latest checkpoint continues a prompt in any modality.

The prompt is `[BOS] [image] [tone] text` (each part optional, laid out as training lays out
media: data/examples.py); the image and the tone are coded against the run's codebooks. N samples
(`--samples`) run as one batch through the cached decoder (train/generate.py); each is scored by
its mean log-probability per token (under the constrained distribution at temperature 1), the best
one is printed and its media written: an image span as a PNG (codebook centroids -> pixels), an
audio span as a WAV (centroid log-mel frames -> Griffin-Lim, train/media_out.py), a video span (one
clip with its sound, data/video_layout.py) as an animated GIF and a WAV. A span cut off by
--max-new-tokens is reported and not written. `--media image|audio|video` makes every sample start
with one whole item of that modality; otherwise a sample opens a span of any medium the run has a
codebook for when the model writes its first code. `--effort` runs the checkpoint at another
active fraction (train/effort.py `at_effort`).
"""
import dataclasses
import pathlib
from typing import Callable

import jax
import numpy as np

from omnimoe.data import records
from omnimoe.data.examples import make_sequence
from omnimoe.data.pipeline import sources as sources_lib
from omnimoe.data.prepare import audio_io, image_io
from omnimoe.data.prepare import folder as folder_lib
from omnimoe.model.modality import BY_NAME
from omnimoe.train import config as config_lib, effort as effort_lib, loop, media_files, media_out
from omnimoe.train import media_spans
from omnimoe.train.config import Config
from omnimoe.train.generate import feature_table, make_generate
from omnimoe.train.sampling import Sampler
from omnimoe.train.state import eval_params

MediaError = image_io.MediaError          # unreadable --image / --audio: exit 3


@dataclasses.dataclass(frozen=True)
class Request:
  prompt: str = ""                 # text after the media
  image: str | None = None         # a PNG/JPEG in the prompt
  audio: str | None = None         # a WAV in the prompt
  media: str | None = None         # start every sample with one item of this modality
  out: str | None = None           # where media files go (default: WORKDIR/generated)
  max_new_tokens: int = 64
  temperature: float = 0.0         # 0 = greedy
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  effort: str = "medium"
  samples: int = 1


def check(req: Request) -> Sampler:
  """The request's sampler; a bad number or effort is a one-line ConfigError (exit 2)."""
  if req.samples < 1:
    raise config_lib.ConfigError(f"--samples must be >= 1, got {req.samples}")
  if req.max_new_tokens < 1:
    raise config_lib.ConfigError(f"--max-new-tokens must be >= 1, got {req.max_new_tokens}")
  if "," in req.effort:
    raise config_lib.ConfigError(f"--effort takes one level, got '{req.effort}'")
  effort_lib.parse_efforts(req.effort)
  try:
    return Sampler(req.temperature, req.top_k, req.top_p)
  except ValueError as e:
    raise config_lib.ConfigError(str(e).replace("top_p", "--top-p").replace(
        "temperature", "--temperature").replace("top_k", "--top-k")) from None


def prompt_example(req: Request, cfg: Config, mix):
  """The prompt as one example (no EOS); raises MediaError for an unreadable image or sound."""
  parts = []
  if req.image:
    try:
      patches = image_io.load_patches(req.image, cfg.data)
    except MediaError as e:
      raise MediaError(f"--image {req.image}: {e}") from None
    parts.append(folder_lib.media_of(records.ImagePart(patches, image_io.grid(cfg.data)),
                                     mix.vocab, mix.codebooks, mix.feature_dim))
  if req.audio:
    try:
      frames = audio_io.load_frames(req.audio, cfg.data)
    except MediaError as e:
      raise MediaError(f"--audio {req.audio}: {e}") from None
    parts.append(folder_lib.media_of(records.AudioPart(frames), mix.vocab, mix.codebooks,
                                     mix.feature_dim))
  if req.prompt:
    parts.append(mix.vocab.encode_text(req.prompt))
  return make_sequence(parts, mix.feature_dim, eos=False, specials=mix.vocab)


def _pieces(tokens, vocab, spans) -> list[tuple[str, np.ndarray]]:
  """A sample's tokens up to EOS as consecutive ("text" | media name, ids) pieces: a code that can
  open an item (the first slot of its kind) starts one, which then holds its next `length` tokens
  (a clip's video and audio codes together), as constrained decoding wrote them."""
  ends = np.flatnonzero(tokens == vocab.eos)
  tokens = tokens[:ends[0]] if len(ends) else tokens
  pieces, i = [], 0
  while i < len(tokens):
    opens = [k for k in range(len(spans.names))
             if spans.slot_lo[k, 0] <= tokens[i] < spans.slot_hi[k, 0]]
    if opens:
      k = opens[0]
      pieces.append((spans.names[k], tokens[i:i + spans.length[k]]))
      i += spans.length[k]
    elif pieces and pieces[-1][0] == "text":
      pieces[-1] = ("text", np.append(pieces[-1][1], tokens[i]))
      i += 1
    else:
      pieces.append(("text", tokens[i:i + 1]))
      i += 1
  return [(k, np.asarray(ids, np.int32)) for k, ids in pieces]


def _write_media(pieces, spans, mix, cfg: Config, out: pathlib.Path, seed: int) -> list[str]:
  lines, count = [], {}
  for kind, ids in pieces:
    if kind == "text":
      continue
    k = spans.index(kind) - 1
    codes = ids - spans.lo[k]
    n = count[kind] = count.get(kind, 0) + 1
    if len(ids) < spans.length[k]:
      lines.append(f"{kind} {n}: cut off after {len(ids)} of {spans.length[k]} codes, not written")
      continue
    out.mkdir(parents=True, exist_ok=True)
    if kind == "image":
      pixels = media_out.image_pixels(codes, mix.codebooks["image"], cfg.data)
      path = media_out.write_png(out / f"image_{n}.png", pixels)
    elif kind == "video":
      slot = spans.slot_modality[k, :len(ids)]
      video, sound = ids[slot == spans.codes[k]], ids[slot == BY_NAME["audio"].code]
      frames = media_out.video_frames(video - spans.lo[k], mix.codebooks["video"], cfg.data)
      lines.append(f"wrote {media_out.write_gif(out / f'video_{n}.gif', frames, cfg.data)}")
      audio = spans.index("audio") - 1
      wave = media_out.audio_waveform(sound - spans.lo[audio], mix.codebooks["audio"], cfg.data,
                                      seed)
      path = media_out.write_audio(out / f"video_{n}.wav", wave, cfg.data)
    else:
      wave = media_out.audio_waveform(codes, mix.codebooks["audio"], cfg.data, seed)
      path = media_out.write_audio(out / f"audio_{n}.wav", wave, cfg.data)
    lines.append(f"wrote {path}")
  return lines


def generate(cfg: Config, workdir: str | pathlib.Path, req: Request,
             log: Callable[[str], None] = lambda _: None) -> list[str]:
  """Runs the request on the latest checkpoint of `workdir`; the lines to print."""
  sampler = check(req)
  with loop._data_errors():        # the run's own codebooks and tokenizer (train/media_files.py)
    saved = media_files.load(workdir)
    mix = saved if saved is not None else sources_lib.resolve(cfg.data)
  spans = media_spans.spans_for(mix.vocab, cfg.data)
  free = tuple(n for n in spans.names if n in mix.codebooks)   # the media this run has codes for
  force = 0
  if req.media:
    if req.media not in spans.names:
      raise config_lib.ConfigError(f"--media must be one of {', '.join(spans.names)}, got "
                                   f"'{req.media}'")
    if req.media not in free:
      raise config_lib.ConfigError(f"--media {req.media}: this run has no {req.media} codebook "
                                   f"(it trained without {req.media}); it has {', '.join(free)}")
    force = spans.index(req.media)
  example = prompt_example(req, cfg, mix)
  step, state, setup, info, mesh = loop.restore_latest(
      cfg, workdir, info=None if saved is None else media_files.info(saved))
  params, router = eval_params(state), state.get("router")

  def heldout():
    from omnimoe.train.evaluate import load_eval_data
    return load_eval_data(cfg).mixed
  setup, router, details, notes = effort_lib.at_effort(req.effort, cfg, setup, mesh, info, params,
                                                       router, heldout)
  B, P = req.samples, len(example.tokens_N)
  rows = lambda a: np.repeat(a[None], B, axis=0)
  prompt = {"tokens": rows(example.tokens_N), "features": rows(example.features_NxF),
            "modality": rows(example.modality_N), "segment_ids": np.ones((B, P), np.int32),
            "positions": rows(example.positions_Nx3)}
  run = make_generate(setup, spans, prompt_len=P, max_new_tokens=req.max_new_tokens,
                      sampler=sampler, free=free, out_shardings=setup.shardings["step"])
  out = run(params, prompt, np.full(B, example.positions_Nx3[-1, 0] + 1, np.int32),
            jax.random.PRNGKey(req.seed), router, np.full(B, force, np.int32),
            feature_table(spans, mix.codebooks, mix.feature_dim))
  tokens, logp, live = (np.asarray(jax.device_get(a)) for a in (out.tokens, out.log_probs, out.live))
  lengths = live.sum(1)
  mean = logp.sum(1) / np.maximum(lengths, 1)
  best = int(np.argmax(mean))
  lines = [f"checkpoint step {step}, effort {req.effort} {details}"] + notes
  for i in range(B):
    text = mix.vocab.decode_text(tokens[i][live[i]]).decode("utf-8", "replace")
    media = [f"{k} ({len(ids)} codes)" for k, ids in _pieces(tokens[i], mix.vocab, spans)
             if k != "text"]
    lines.append(f"sample {i + 1}: mean log-prob {mean[i]:.4f} over {int(lengths[i])} tokens: "
                 f"{text!r}" + (f" + {', '.join(media)}" if media else ""))
  pieces = _pieces(tokens[best], mix.vocab, spans)
  text = mix.vocab.decode_text(tokens[best][live[best]]).decode("utf-8", "replace")
  lines += [f"best: sample {best + 1}", text if text else "(no text)"]
  folder = pathlib.Path(req.out) if req.out else pathlib.Path(workdir) / "generated"
  return lines + _write_media(pieces, spans, mix, cfg, folder, req.seed)

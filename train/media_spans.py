"""Constrained decoding of media spans, and the (t, h, w) positions of generated tokens.

The unified vocabulary has no "begin image" token: a code's id says its modality. A media span
begins with its first code and holds exactly one whole item of that modality, then ends; the
token after it is text or EOS. While a row decodes (per row, inside jit):
  text state   text ids, EOS, and the first code of any modality in `free` may come;
  in a span    only codes of the span's modality, until it holds `length` of them;
  just closed  text ids or EOS only (one item per span: no second grid glued to the first);
  done         after EOS, PAD only (written with segment 0: outside the document).
PAD, BOS, the reserved id and the ids past the last code never come. A row may also be made to
open a span at its first generated token (`force`): "draw the digit seven:" -> one image.

The spans are read off the modality table (model/modality.py `MEDIA`): a media modality's codes
are the vocabulary's `<name>_offset` .. + `<name>_codes`, and its item's shape (SHAPES) gives the
positions, as data/examples.py lays out real media: an image patch (r, c) of a span starting at
running index s is at (s, s + r, s + c) and the running index continues at s + max(rows, cols); an
audio frame j at (s + j,) * 3, continuing at s + frames; text at (s,) * 3. A video item is a whole
clip of the run's built-in size (`data.video_frames` frames and the audio frames of their time,
interleaved on one clock as data/video_layout.py lays them out): each of its slots takes the codes
of its own modality (a frame's video codes, then that chunk's audio codes, ...), so it opens with a
video code and holds exactly one clip.
"""
import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from omnimoe.data.builtin import dtmf
from omnimoe.data.config import DataConfig
from omnimoe.data.examples import audio_media, image_media
from omnimoe.data.prepare import image_io, video_io
from omnimoe.data.prepare.log_mel import log_mel
from omnimoe.data.video_layout import Clock, clip_media
from omnimoe.model.modality import AUDIO, BY_NAME, IMAGE, MEDIA


def _image_item(cfg: DataConfig):
  grid = image_io.grid(cfg)
  m = image_media(np.zeros(grid[0] * grid[1], np.int32), np.zeros((grid[0] * grid[1], 1)), grid, 1)
  return m.positions_Mx3, m.span, np.full(len(m.tokens_M), IMAGE.code)


def _audio_item(cfg: DataConfig):
  m = audio_media(np.zeros(dtmf.num_frames(cfg), np.int32), np.zeros((dtmf.num_frames(cfg), 1)), 1)
  return m.positions_Mx3, m.span, np.full(len(m.tokens_M), AUDIO.code)


def clip_size(cfg: DataConfig) -> tuple[int, int]:
  """(video tokens, audio frames) of a clip of the built-in size: `data.video_frames` frames at
  `data.video_fps` in tubelets, and the log-mel frames that start within their time."""
  units = -(-cfg.video_frames // cfg.video_tubelet)
  samples = int(round(cfg.video_frames / cfg.video_fps * cfg.sample_rate))
  if samples < cfg.frame_len:
    return units, 0
  return units, len(video_io.cut_sound(log_mel(np.zeros(samples, np.float32), cfg), units, cfg))


def _video_item(cfg: DataConfig):
  units, frames = clip_size(cfg)
  grid = video_io.grid(cfg)
  m = clip_media(np.zeros((units, grid[0] * grid[1]), np.int32),
                 np.zeros((units, grid[0] * grid[1], 1)), grid, np.zeros(frames, np.int32),
                 np.zeros((frames, 1)), Clock.from_config(cfg), 1)
  return m.positions_Mx3, m.span, np.asarray(m.modality, np.int32)


# modality name -> data config -> (positions [n, 3] of one item's codes from running index 0, how
# far the item advances the running index, the modality code of each of its n slots): one whole
# image grid, one tone's frames, one clip with its sound
SHAPES: dict[str, Callable[[DataConfig], tuple[np.ndarray, int, np.ndarray]]] = {
    "image": _image_item, "audio": _audio_item, "video": _video_item}
GENERATED = tuple(m for m in MEDIA if m.name in SHAPES)    # the media a generation may write


@dataclasses.dataclass(frozen=True)
class Spans:
  """The media a generation may write, as arrays (K media modalities, in `GENERATED` order)."""
  names: tuple[str, ...]     # K modality names
  codes: tuple[int, ...]     # K modality codes (model/modality.py)
  lo: np.ndarray             # int32 [K]: first id of each modality's codes
  hi: np.ndarray             # int32 [K]: one past the last
  length: np.ndarray         # int32 [K]: codes in one item
  slot_modality: np.ndarray  # int32 [K, N]: the modality code of each slot of an item (padded
                             # to N with the item's own code)
  offsets: np.ndarray        # int32 [K, N, 3]: positions of an item's codes (padded to N)
  advance: np.ndarray        # int32 [K]: running index advance of one item
  text_lo: int               # first text id
  text_hi: int               # one past the last text id
  size: int                  # V, columns of the logits
  pad: int                   # the vocabulary's special ids (data/vocab.py)
  bos: int
  eos: int

  @functools.cached_property
  def slot_lo(self) -> np.ndarray:
    """int32 [K, N]: the first id each slot of an item may take (its modality's `lo`)."""
    return self._slot_range(self.lo)

  @functools.cached_property
  def slot_hi(self) -> np.ndarray:
    """int32 [K, N]: one past the last id each slot may take."""
    return self._slot_range(self.hi)

  def _slot_range(self, bound_K: np.ndarray) -> np.ndarray:
    k_KxN = np.argmax(self.slot_modality[..., None] == np.asarray(self.codes), axis=-1)
    return np.asarray(bound_K, np.int32)[k_KxN]

  def index(self, name: str) -> int:
    """1-based index of a modality in the table (the value of `State.span` and of `force`)."""
    if name not in self.names:
      raise ValueError(f"no media modality {name!r}; choose from {', '.join(self.names)}")
    return self.names.index(name) + 1


def spans_for(vocab, cfg: DataConfig) -> Spans:
  items = [SHAPES[m.name](cfg) for m in GENERATED]
  n = max(len(p) for p, *_ in items)
  offsets = np.zeros((len(GENERATED), n, 3), np.int32)
  for k, (p, *_) in enumerate(items):
    offsets[k, :len(p)] = p
  lo = np.asarray([getattr(vocab, f"{m.name}_offset") for m in GENERATED], np.int32)
  count = np.asarray([getattr(vocab, f"{m.name}_codes") for m in GENERATED], np.int32)
  slot_modality = np.asarray([[m.code] * n for m in GENERATED], np.int32)
  for k, (p, _, modality) in enumerate(items):
    slot_modality[k, :len(p)] = modality
  return Spans(tuple(m.name for m in GENERATED), tuple(m.code for m in GENERATED), lo, lo + count,
               np.asarray([len(p) for p, *_ in items], np.int32), slot_modality, offsets,
               np.asarray([a for _, a, _ in items], np.int32), vocab.text_offset, vocab.text_end,
               vocab.size, vocab.pad, vocab.bos, vocab.eos)


class State(NamedTuple):
  """Per row, int32 [B] (bool for the flags)."""
  running: jax.Array         # running index of the next text token
  span: jax.Array            # 1-based index of the open span's modality, 0 = none
  filled: jax.Array          # codes written into the open span
  start: jax.Array           # running index where the open span started
  closed: jax.Array          # a span just closed: text or EOS next
  done: jax.Array            # EOS written


def initial_state(next_position_B, force_B=None) -> State:
  """`next_position_B`: the running index after each prompt; `force_B` (int32 [B], 0 = none): the
  1-based media index (Spans.index) each row's first generated token must open."""
  running = jnp.asarray(next_position_B, jnp.int32)
  force = jnp.zeros_like(running) if force_B is None else jnp.asarray(force_B, jnp.int32)
  zero = jnp.zeros_like(running)
  no = jnp.zeros(running.shape, bool)
  return State(running, force, zero, running, no, no)


def allowed(spans: Spans, state: State, free: tuple[str, ...]) -> jax.Array:
  """bool [B, V]: the ids each row may write next (`free`: the media a text state may open)."""
  ids_V = jnp.arange(spans.size)
  first_KxV = (ids_V >= spans.slot_lo[:, :1]) & (ids_V < spans.slot_hi[:, :1])   # opens an item
  text_V = (((ids_V >= spans.text_lo) & (ids_V < spans.text_hi) & (ids_V != spans.pad)
             & (ids_V != spans.bos)) | (ids_V == spans.eos))
  opens_V = jnp.zeros_like(text_V)
  for name in free:
    opens_V = opens_V | first_KxV[spans.index(name) - 1]
  k_B = jnp.maximum(state.span - 1, 0)               # the open item's next slot takes its range
  lo_B = jnp.asarray(spans.slot_lo)[k_B, state.filled]
  hi_B = jnp.asarray(spans.slot_hi)[k_B, state.filled]
  in_span_BxV = (ids_V[None] >= lo_B[:, None]) & (ids_V[None] < hi_B[:, None])
  text_BxV = text_V[None] | (opens_V[None] & ~state.closed[:, None])
  out = jnp.where((state.span > 0)[:, None], in_span_BxV, text_BxV)
  return jnp.where(state.done[:, None], (ids_V == spans.pad)[None], out)


def advance(spans: Spans, state: State, token_B: jax.Array):
  """After writing `token_B` (chosen among `allowed`): (next state, its position int32 [B, 3],
  live bool [B]: the token belongs to the document, i.e. the row was not done before it)."""
  token_B = jnp.asarray(token_B, jnp.int32)
  first_lo, first_hi = spans.slot_lo[:, 0], spans.slot_hi[:, 0]     # the slot that opens an item
  kind_B = jnp.sum(jnp.where((token_B[:, None] >= first_lo) & (token_B[:, None] < first_hi),
                             jnp.arange(1, len(spans.lo) + 1), 0), axis=-1)
  open_B = jnp.where(state.span > 0, state.span, kind_B)
  media_B = open_B > 0
  k_B = jnp.maximum(open_B - 1, 0)
  start_B = jnp.where(state.span > 0, state.start, state.running)
  filled_B = jnp.where(state.span > 0, state.filled, 0)
  offset_Bx3 = jnp.asarray(spans.offsets)[k_B, filled_B]
  position_Bx3 = jnp.where(media_B[:, None], start_B[:, None] + offset_Bx3,
                           state.running[:, None] * jnp.ones(3, jnp.int32))
  complete_B = media_B & (filled_B + 1 == jnp.asarray(spans.length)[k_B])
  running_B = jnp.where(complete_B, start_B + jnp.asarray(spans.advance)[k_B],
                        jnp.where(media_B, state.running, state.running + 1))
  span_B = jnp.where(media_B & ~complete_B, open_B, 0)
  live_B = ~state.done
  keep = lambda new, old: jnp.where(live_B, new, old)
  new = State(keep(running_B, state.running), keep(span_B, state.span),
              keep(jnp.where(span_B > 0, filled_B + 1, 0), state.filled),
              keep(start_B, state.start), keep(complete_B, state.closed),
              state.done | (token_B == spans.eos))
  return new, position_Bx3.astype(jnp.int32), live_B


def modality_of(spans: Spans, token_B: jax.Array) -> jax.Array:
  """int32 [B]: the modality code a written token gets in the batch (specials count as text)."""
  out = jnp.full(token_B.shape, BY_NAME["text"].code, jnp.int32)
  for k, code in enumerate(spans.codes):
    out = jnp.where((token_B >= spans.lo[k]) & (token_B < spans.hi[k]), code, out)
  return jnp.where(token_B == spans.pad, BY_NAME["pad"].code, out)

"""The modalities of the unified sequence: one table, imported by data/, model/ and train/.

A row is a modality's name, its code (the value of the batch's `modality` array) and what one
position of it carries. `model/` embeds by it, the router keeps per-modality statistics by it,
`data/` writes it into batches and `train/` names metrics by it. Plain Python (no jax), so that
`omnimoe report` can read it cheaply.

Adding a modality is one row here plus its place in `MODALITIES` (and in `MEDIA` when it is
embedded from `features`); every per-modality array grows with it. Video (code 4) came that way:
the router's statistics, the balance bias, the loss weights, the metric keys and the report's
heatmap gained a video column from this table alone (tests/test_video_modality.py).
"""
from typing import NamedTuple


class Modality(NamedTuple):
  name: str                   # in metric keys (`eval/loss/image`) and config keys
  code: int                   # value in the batch's `modality` array
  carries: str                # what one position holds


PAD = Modality("pad", 0, "nothing: padding (segment id 0, no loss)")
TEXT = Modality("text", 1, "a text token or BOS/EOS: `tokens` looks up the embedding table")
IMAGE = Modality("image", 2, "an image patch: its codebook id in `tokens`, the patch in `features`")
AUDIO = Modality("audio", 3, "an audio frame: its codebook id in `tokens`, the log-mel frame in "
                             "`features`")

VIDEO = Modality("video", 4, "a video patch (one frame, or a tubelet of frames): its codebook id "
                             "in `tokens`, the patch in `features`")

MODALITIES = (TEXT, IMAGE, AUDIO, VIDEO)   # every modality with tokens, by code (1, 2, ...): statistics
                                    # per modality are arrays indexed by `code - 1` in this order
MEDIA = (IMAGE, AUDIO, VIDEO)       # embedded from `features` by a linear map of their own
NAMES = tuple(m.name for m in MODALITIES)
CODES = tuple(m.code for m in MODALITIES)
BY_NAME = {m.name: m for m in (PAD, *MODALITIES)}

assert CODES == tuple(range(1, len(MODALITIES) + 1)), "codes must be 1, 2, ... in table order"

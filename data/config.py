"""Typed configuration of the data pipeline; every field is a config key under `data.`."""
import dataclasses


@dataclasses.dataclass(frozen=True)
class DataConfig:
  seq_len: int = 128              # packed row length L
  image_patch: int = 2            # image patch side in pixels (digits are 8x8)
  image_codebook: int = 64        # k-means codes for image patches
  audio_codebook: int = 64        # k-means codes for audio frames
  sample_rate: int = 8000         # audio sample rate (Hz)
  n_mels: int = 24                # log-mel bands per audio frame
  frame_len: int = 256            # STFT window (samples)
  frame_hop: int = 128            # STFT hop (samples)
  tone_seconds: float = 0.2       # duration of one synthesized DTMF tone
  weight_image: float = 0.4       # mixture weight of image+caption examples
  weight_audio: float = 0.4       # mixture weight of tone+caption examples
  weight_text: float = 0.2        # mixture weight of text-only examples
  loss_weight_text: float = 1.0   # loss weight of positions whose target is text
  loss_weight_image: float = 1.0  # ... whose target is an image code
  loss_weight_audio: float = 1.0  # ... whose target is an audio code
  image_shift: int = 0           # training images move by up to this many pixels (zero fill); 0 = off
  heldout_fraction: float = 0.2   # share of digit images and text documents held out for eval
  prefetch: int = 2               # batches prepared ahead in a background thread (0 = none)

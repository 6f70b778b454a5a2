"""Typed configuration of the data pipeline; every field is a config key under `data.`."""
import dataclasses

DEFAULT_SOURCE = "default"      # the `path` that names the built-in default dataset
TASKS = ("mixture", "needle")   # data.task


@dataclasses.dataclass(frozen=True)
class Source:
  """One entry of `data.sources`."""
  path: str                       # a folder written by `omnimoe prepare`, or `default`
  weight: float = 1.0             # mixture weight: share of examples drawn from this source


@dataclasses.dataclass(frozen=True)
class DataConfig:
  task: str = "mixture"           # mixture: data.sources mixed by weight | needle: the built-in
                                  # retrieval task (facts in haystacks of prose, docs/needle.md)
  sources: tuple[Source, ...] = ()  # [{path, weight}, ...]; [] = the built-in default dataset only
  seq_len: int = 128              # packed row length L
  image_patch: int = 4            # image patch side in pixels (digits are 8x8: a 2x2 grid)
  image_codebook: int = 64        # k-means codes for image patches
  audio_codebook: int = 64        # k-means codes for audio frames
  sample_rate: int = 8000         # audio sample rate (Hz)
  n_mels: int = 24                # log-mel bands per audio frame
  frame_len: int = 256            # STFT window (samples)
  frame_hop: int = 128            # STFT hop (samples)
  tone_seconds: float = 0.2       # duration of one synthesized DTMF tone
  weight_image: float = 0.7       # mixture weight of image+caption examples
  weight_audio: float = 0.15      # mixture weight of tone+caption examples
  weight_text: float = 0.15       # mixture weight of text-only examples
  loss_weight_text: float = 1.0   # loss weight of positions whose target is text
  loss_weight_image: float = 0.0  # ... an image code (0: predicting patches overfits 1.4k images)
  loss_weight_audio: float = 1.0  # ... whose target is an audio code
  loss_weight_video: float = 0.0  # ... a video code (0: like images, the clips' text carries the loss)
  image_shift: int = 0           # training images move by up to this many pixels (zero fill); 0 = off
  image_loss: str = "all"         # which training records' image codes carry data.loss_weight_image:
                                  # "all", or "caption_first" (only records shown text first: text ->
                                  # image is learnt, an image from nothing is not, so the loss
                                  # cannot memorise the training digits as they are read)
  caption_first: float = 0.0      # share of training records "media, text" shown text first ("the
                                  # digit seven" then the image): teaches text -> image / audio
                                  # (with loss_weight_image > 0 for images); 0 = off
  heldout_fraction: float = 0.2   # share of digit images and text documents held out for eval
  prefetch: int = 2               # batches prepared ahead in a background thread (0 = none)
  image_side: int = 8             # `omnimoe prepare`: images are resized to side x side pixels
  image_channels: int = 1         # `omnimoe prepare`: 1 = grayscale, 3 = RGB (channels innermost)
  # Video (docs/video.md): frames are cut into patch grids like images (channels: image_channels);
  # sound and picture share one clock, t counting data.time_step_ms steps.
  video_codebook: int = 64        # k-means codes for video patches (tubelets)
  video_side: int = 16            # frames are resized to side x side pixels
  video_patch: int = 4            # video patch side in pixels (16 / 4: a 4x4 grid per frame)
  video_tubelet: int = 1          # frames per video token (1, or 2: a patch spans two frames)
  video_fps: float = 10.0         # frames per second of a prepared clip
  video_frames: int = 8           # frames of a built-in synthetic clip (data/builtin/clips.py), and
                                  # the most a prepared clip keeps while video_max_seconds is 0
  video_max_seconds: float = 0.0  # `omnimoe prepare` keeps a clip's first this many seconds (0:
                                  # video_frames / video_fps)
  time_step_ms: float = 100.0     # one step of the shared clock t (a frame and its audio share t)
  video_chunk_ms: float = 400.0   # a clip is laid out chunk by chunk: its frames, then its audio
  audio_time_ids: str = "shared"  # shared: a clip's audio frames take t from the clock | decoupled:
                                  # the clock's t plus a per-clip offset (the ablation; layout unchanged)
  weight_video: float = 0.0       # mixture weight of the built-in clips (0: no video in the run)
  video_clips: int = 2000         # built-in clips written (the last heldout_fraction held out)
  tokenizer: str = ""             # text tokenizer: "" = UTF-8 bytes; else a sentencepiece .model file
                                  # (relative: from the current directory; `python -m omnimoe.data.tokenizer
                                  # train` makes one); the vocabulary grows to its pieces
  # data.task=needle (data/builtin/needle.py, data/pipeline/needle.py; docs/needle.md):
  needle_lengths: tuple[int, ...] = (2048,)  # training document lengths, one per curriculum phase;
                                  # each divides data.seq_len (a row holds seq_len / length documents)
  needle_phase_steps: tuple[int, ...] = ()   # steps (batches) of each phase but the last, which runs
                                  # to the end: len(needle_lengths) - 1 numbers
  needle_facts: tuple[int, ...] = (8,)      # facts planted in a training haystack: one number, or
                                  # one per phase (a curriculum of harder haystacks)
  needle_questions: tuple[int, ...] = (8,)  # questions at its end about distinct facts (loss on the
                                  # answers): one number, or one per phase
  needle_eval_lengths: tuple[int, ...] = (512, 1024, 2048)  # held-out haystack lengths H (tokens
                                  # before the questions; each row is H + the questions + padding)
  needle_eval_docs: int = 100     # held-out documents per length
  needle_eval_facts: int = 5      # facts in a held-out haystack
  needle_eval_questions: int = 5  # questions per held-out document; their facts' depth deciles
                                  # cycle 0..9 over the documents of a length (equal counts per decile)


def image_patch_dim(cfg: DataConfig) -> int:
  """Width of one image patch vector: channels * patch * patch."""
  return cfg.image_channels * cfg.image_patch ** 2


def video_patch_dim(cfg: DataConfig) -> int:
  """Width of one video token: tubelet frames * channels * patch * patch."""
  return cfg.video_tubelet * cfg.image_channels * cfg.video_patch ** 2


def feature_dim(cfg: DataConfig) -> int:
  """F, the width of the batch's `features`: the widest of an image patch, an audio frame and a
  video patch."""
  return max(image_patch_dim(cfg), cfg.n_mels, video_patch_dim(cfg))

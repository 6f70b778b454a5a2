"""Generating video: a clip with its sound as one constrained span, laid out as training lays out a
clip (data/video_layout.py is the reference), and its codes drawn back into frames and a WAV."""
import jax
import numpy as np
import pytest
from flax import nnx

from omnimoe.data.builtin import clips as clips_lib
from omnimoe.data.config import DataConfig, feature_dim
from omnimoe.data.examples import make_sequence
from omnimoe.data.prepare import audio_io, video_io
from omnimoe.data.video_layout import Clock, clip_media
from omnimoe.data.vocab import Vocab
from omnimoe.model.config import ModelConfig, MoEConfig
from omnimoe.model.decoder import Decoder
from omnimoe.model.modality import AUDIO, VIDEO
from omnimoe.train import generate_run, media_out, media_spans
from omnimoe.train.generate import make_generate
from omnimoe.train.sampling import Sampler
from omnimoe.train.state import Setup

# A small clip: 4 frames of 12 x 12 in tubelets of 2, 2 x 2 patches of 6 pixels (8 video tokens),
# 0.4 s of sound (24 log-mel frames), two chunks of 200 ms.
DATA = DataConfig(video_side=12, video_patch=6, video_frames=4, video_tubelet=2, video_fps=10.0,
                  time_step_ms=100.0, video_chunk_ms=200.0)
VOCAB = Vocab.from_config(DATA)
SPANS = media_spans.spans_for(VOCAB, DATA)
F = feature_dim(DATA)
CFG = ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                  rope_sections=(2, 1, 1), attention_block=8,
                  moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32, block_rows=8))


def real_clip(seed=0):
  """(frames [4, 12, 12, 1] in [0, 1], video tokens [U, M, D], log-mel frames [A, n_mels]) of a
  built-in clip: what `omnimoe prepare` makes of one."""
  rng = np.random.default_rng(seed)
  digit = rng.integers(0, 256, (8, 8)).astype(np.uint8)
  motion = clips_lib.draw_motion(rng, DATA.video_side)
  clip = clips_lib.make_clip(digit, motion, True, rng, side=DATA.video_side,
                             frames=DATA.video_frames, fps=DATA.video_fps,
                             sample_rate=DATA.sample_rate)
  frames = clip.frames_NxHxW.astype(np.float32)[..., None] / 255.0
  tokens = video_io.tokens(frames, DATA)
  sound = video_io.cut_sound(audio_io.frames(clip.wave, DATA.sample_rate, DATA), len(tokens), DATA)
  return frames, tokens, sound


def test_a_clip_item_has_the_layout_of_a_real_clip():
  """The video item of the spans table: as many slots as a real clip of this size has tokens, each
  taking its own modality's codes, at the positions data/video_layout.py gives the real clip."""
  _, tokens, sound = real_clip()
  U, M, _ = tokens.shape
  assert (U, M) == (2, 4) and media_spans.clip_size(DATA) == (2, len(sound)) and len(sound) == 24
  media = clip_media(np.zeros((U, M), np.int32), tokens, (2, 2), np.zeros(len(sound), np.int32),
                     sound, Clock.from_config(DATA), F)
  k = SPANS.index("video") - 1
  n = SPANS.length[k]
  assert n == U * M + len(sound) == len(media.tokens_M)
  video = (SPANS.slot_lo[k, :n] == VOCAB.video_offset) & (SPANS.slot_hi[k, :n] ==
                                                         VOCAB.video_offset + VOCAB.video_codes)
  audio = (SPANS.slot_lo[k, :n] == VOCAB.audio_offset) & (SPANS.slot_hi[k, :n] ==
                                                         VOCAB.audio_offset + VOCAB.audio_codes)
  np.testing.assert_array_equal(video, media.modality == VIDEO.code)
  np.testing.assert_array_equal(audio, media.modality == AUDIO.code)
  # chunk 0: the first tubelet's 4 patches, then the 13 audio frames that start before 200 ms
  assert list(media.modality[:5]) == [VIDEO.code] * 4 + [AUDIO.code]
  assert list(media.modality[4:17]) == [AUDIO.code] * 13 and media.modality[17] == VIDEO.code
  np.testing.assert_array_equal(SPANS.offsets[k, :n], media.positions_Mx3)
  assert SPANS.advance[k] == media.span


def test_forced_clips_from_an_untrained_model_are_whole_and_placed_like_real_ones():
  """Rows made to start with a clip (an untrained model, whose free choices would break it):
  every slot gets a code of its modality, the clip ends after exactly its length, and the
  positions are those make_sequence gives the same parts."""
  graphdef, state = nnx.split(Decoder(CFG, vocab_size=VOCAB.size, feature_dim=F, rngs=nnx.Rngs(0)))
  setup = Setup(graphdef, None, {}, {}, VOCAB.size, F)
  text = VOCAB.encode_text(b"a clip:")
  example = make_sequence([text], F, eos=False, specials=VOCAB)
  B, P = 4, len(example.tokens_N)
  rows = lambda a: np.repeat(a[None], B, axis=0)
  prompt = {"tokens": rows(example.tokens_N), "features": rows(example.features_NxF),
            "modality": rows(example.modality_N), "segment_ids": np.ones((B, P), np.int32),
            "positions": rows(example.positions_Nx3)}
  k = SPANS.index("video") - 1
  n = int(SPANS.length[k])
  gen = make_generate(setup, SPANS, prompt_len=P, max_new_tokens=n + 3,
                      sampler=Sampler(temperature=1.0), free=SPANS.names, keep_logits=True)
  out = gen(nnx.to_pure_dict(state), prompt, np.full(B, P, np.int32), jax.random.key(0), None,
            np.full(B, k + 1, np.int32))
  tokens, positions = np.asarray(out.tokens), np.asarray(out.positions)
  _, clip_tokens, sound = real_clip()
  media = clip_media(np.zeros(clip_tokens.shape[:2], np.int32), clip_tokens, (2, 2),
                     np.zeros(len(sound), np.int32), sound, Clock.from_config(DATA), F)
  want = make_sequence([text, media, VOCAB.encode_text(b"x")], F, eos=False,
                       specials=VOCAB).positions_Nx3[P:]
  for row, pos in zip(tokens, positions):
    np.testing.assert_array_equal(VOCAB.modality_of(row[:n]), media.modality)
    assert VOCAB.modality_of(row[n:n + 1]) != VIDEO.code      # closed: no second clip glued on
    if row[n] != VOCAB.eos:
      np.testing.assert_array_equal(pos[:n + 1], want)
  # The free choices would break the clip: inside it most of the probability lies elsewhere.
  p = np.asarray(jax.nn.softmax(np.asarray(out.logits)[:, 1:n], axis=-1))
  ids = np.arange(VOCAB.size)
  right = np.stack([(ids >= SPANS.slot_lo[k, j]) & (ids < SPANS.slot_hi[k, j]) for j in range(1, n)])
  assert float((p * ~right[None]).sum(-1).min()) > 0.5
  # The pieces generate_run writes: the clip is one piece, then text.
  pieces = generate_run._pieces(np.append(tokens[0, :n], [VOCAB.encode_text(b"ok")[0], VOCAB.eos]),
                                VOCAB, SPANS)
  assert [(kind, len(ids)) for kind, ids in pieces] == [("video", n), ("text", 1)]


def test_a_clip_is_drawn_back_into_its_frames_and_its_sound(tmp_path):
  """With every token its own centroid, the frames come back exactly (the tubelets and patches
  undone in the right order); the GIF holds them at video_fps, the WAV the clip's sound."""
  from PIL import Image
  frames, tokens, sound = real_clip(seed=3)
  U, M, D = tokens.shape
  book = tokens.reshape(U * M, D)
  got = media_out.video_frames(np.arange(U * M), book, DATA)
  np.testing.assert_array_equal(got, frames)
  path = media_out.write_gif(tmp_path / "clip.gif", got, DATA)
  with Image.open(path) as gif:
    assert gif.n_frames == 4 and gif.size == (12, 12) and gif.info["duration"] == 100
    gif.seek(2)
    np.testing.assert_array_equal(np.asarray(gif.convert("L")), np.rint(frames[2, ..., 0] * 255))
  # generate_run's writer splits a generated clip into its video and audio codes
  codebooks = {"video": book, "audio": sound}
  ids = np.zeros(SPANS.length[SPANS.index("video") - 1], np.int32)
  k = SPANS.index("video") - 1
  is_video = SPANS.slot_lo[k, :len(ids)] == VOCAB.video_offset
  ids[is_video] = VOCAB.video_offset + np.arange(U * M)
  ids[~is_video] = VOCAB.audio_offset + np.arange(len(sound))
  mix = type("Mix", (), {"codebooks": codebooks})()
  cfg = type("Cfg", (), {"data": DATA})()
  lines = generate_run._write_media([("video", ids)], SPANS, mix, cfg, tmp_path / "out", 0)
  assert lines == [f"wrote {tmp_path / 'out' / 'video_1.gif'}", f"wrote {tmp_path / 'out' / 'video_1.wav'}"]
  with Image.open(tmp_path / "out" / "video_1.gif") as gif:
    gif.seek(3)
    np.testing.assert_array_equal(np.asarray(gif.convert("L")), np.rint(frames[3, ..., 0] * 255))
  import wave
  with wave.open(str(tmp_path / "out" / "video_1.wav")) as w:
    assert w.getnframes() == DATA.frame_len + (len(sound) - 1) * DATA.frame_hop


SMALL = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1",
         "model.head_dim=16", "model.rope_sections=[4,2,2]", "model.moe.num_experts=4",
         "model.moe.expert_hidden=32", "data.seq_len=64", "train.batch_size=8", "train.steps=2",
         "checkpoint.every_steps=2", "eval.every_steps=0", "eval.num_batches=1", "eval.batch_size=8",
         "eval.image_limit=2", "eval.audio_limit=2", "eval.text_limit=1", "eval.video_limit=2",
         "data.video_side=12", "data.video_patch=6", "data.video_frames=4", "data.video_tubelet=2",
         "data.time_step_ms=100", "data.video_chunk_ms=200", "data.heldout_fraction=0.25"]


@pytest.mark.slow    # a two-step training run over prepared clips, then generation
def test_generate_writes_a_clip_of_a_run_that_trained_on_clips(tmp_path, capsys):
  """`omnimoe generate --media video` on a two-step run over prepared built-in clips: one GIF of
  the clip's frames and one WAV of its sound."""
  import dataclasses
  from PIL import Image
  from omnimoe.data.builtin.clip_files import write_clips
  from omnimoe.data.prepare import write as prepare
  from omnimoe.train.cli import main
  data = dataclasses.replace(DATA, seq_len=64, heldout_fraction=0.25)
  prepare.prepare(write_clips(tmp_path / "files", data, clips=8), tmp_path / "clips", data)
  run = tmp_path / "run"
  assert main(["train", *SMALL, f"data.sources=[{{path: {tmp_path / 'clips'}, weight: 1.0}}]",
               "--workdir", str(run)]) == 0
  n = int(SPANS.length[SPANS.index("video") - 1])
  out = tmp_path / "out"
  capsys.readouterr()
  assert main(["generate", "--workdir", str(run), "--media", "video", "--max-new-tokens", str(n),
               "--out", str(out)]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert f"wrote {out / 'video_1.gif'}" in lines and f"wrote {out / 'video_1.wav'}" in lines
  with Image.open(out / "video_1.gif") as gif:
    assert gif.n_frames == 4 and gif.size == (12, 12)
  # one slot short: the clip is cut off, reported and not written
  assert main(["generate", "--workdir", str(run), "--media", "video", "--max-new-tokens",
               str(n - 1), "--out", str(tmp_path / "cut")]) == 0
  assert f"video 1: cut off after {n - 1} of {n} codes, not written" in capsys.readouterr().out
  assert not (tmp_path / "cut").exists()

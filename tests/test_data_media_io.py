"""Decoding user files: manifest lines, images (Pillow), WAV (stdlib), resampling, record bytes."""
import dataclasses

import numpy as np
import pytest
from oracles import patchify_loop
from PIL import Image

from omnimoe.data import records
from omnimoe.data.prepare import audio_io
from omnimoe.data.builtin import dtmf
from omnimoe.data.prepare import log_mel as log_mel_lib
from omnimoe.data.prepare import image_io
from omnimoe.data.prepare import manifest
from omnimoe.data.config import DataConfig
from omnimoe.data.builtin.demo_files import write_png, write_wav

CFG = DataConfig(image_patch=2, image_side=8, image_channels=1, sample_rate=8000)   # pinned: defaults get tuned


# --- manifest ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, kinds", [
    ('{"text": "hello"}', [("text", "hello")]),
    ('{"text": "a cat", "image": "cat.png"}', [("image", "cat.png"), ("text", "a cat")]),
    ('{"audio": "x.wav", "text": "hi", "image": "y.png"}',
     [("image", "y.png"), ("audio", "x.wav"), ("text", "hi")]),
    ('{"parts": [{"text": "see"}, {"image": "a.png"}, {"audio": "b.wav"}, {"text": "end"}]}',
     [("text", "see"), ("image", "a.png"), ("audio", "b.wav"), ("text", "end")]),
    ('{"image": "only.png"}', [("image", "only.png")]),
    ('[{"image": "a.png"}, {"text": "a cat"}]', [("image", "a.png"), ("text", "a cat")]),
])
def test_manifest_line_forms(text, kinds):
  entry = manifest.parse_line(4, text)
  assert entry.line == 4
  assert [(p.kind, p.value) for p in entry.parts] == kinds


@pytest.mark.parametrize("text, needle", [
    ('{"text": "a",', "not valid JSON"),
    ('["text"]', "part 1 must be one of"),
    ('"a cat"', "must be a JSON object or a list of parts"),
    ('[]', "empty example"),
    ('[{"image": "a.png", "split": "train"}]', "part 1 must be one of"),
    ('{"imgae": "a.png", "text": "x"}', "unknown key 'imgae'"),
    ('{"parts": [{"text": "a", "image": "b.png"}]}', "part 1 must be one of"),
    ('{"parts": {"text": "a"}}', "'parts' must be a list"),
    ('{"parts": [], "id": 3}', "unknown key 'id' next to 'parts'"),
    ('{"text": 7}', "must be a string"),
    ('{"text": ""}', "empty example"),
    ('{"parts": []}', "empty example"),
    ('{"image": ""}', "empty image path"),
])
def test_bad_manifest_lines(text, needle):
  with pytest.raises(manifest.BadLine) as e:
    manifest.parse_line(9, text)
  assert needle in e.value.reason and e.value.line == 9


def test_a_bare_list_of_parts_is_the_same_example_as_parts():
  bare = manifest.parse_line(2, '[{"text": "see"}, {"image": "a.png"}, {"audio": "b.wav"}]')
  keyed = manifest.parse_line(2, '{"parts": [{"text": "see"}, {"image": "a.png"}, {"audio": "b.wav"}]}')
  assert bare == keyed and bare.split is None


def test_manifest_read_numbers_lines_and_skips_blanks(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text('{"text": "a"}\n\n{"text": \n   \n{"text": "b"}\n')
  got = list(manifest.read(path))
  assert [g.line for g in got] == [1, 3, 5]
  assert isinstance(got[1], manifest.BadLine) and got[2].parts[0].value == "b"
  assert manifest.count_examples(path) == 3


# --- images -----------------------------------------------------------------------------------

def test_grayscale_png_patches_are_exact(tmp_path):
  pixels = np.random.default_rng(0).integers(0, 256, (8, 8)).astype(np.uint8)
  write_png(tmp_path / "a.png", pixels)
  patches = image_io.load_patches(tmp_path / "a.png", CFG)
  expected = patchify_loop(pixels.astype(np.float32) / 255, CFG.image_patch)
  np.testing.assert_array_equal(patches, expected)
  assert patches.shape == (16, 4) and patches.dtype == np.float32


def test_rgb_patch_layout_channels_innermost(tmp_path):
  cfg = dataclasses.replace(CFG, image_side=4, image_channels=3, image_patch=2)
  pixels = np.random.default_rng(1).integers(0, 256, (4, 4, 3)).astype(np.uint8)
  write_png(tmp_path / "c.png", pixels)
  patches = image_io.load_patches(tmp_path / "c.png", cfg)
  assert patches.shape == (4, 12)
  x = pixels.astype(np.float32) / 255
  np.testing.assert_array_equal(patches[0], x[0:2, 0:2].reshape(-1))     # top-left, (r, c, ch)
  np.testing.assert_array_equal(patches[1], x[0:2, 2:4].reshape(-1))     # to its right
  np.testing.assert_array_equal(patches[2], x[2:4, 0:2].reshape(-1))     # next patch row


def test_rgb_to_gray_and_resize_follow_pillow(tmp_path):
  rgb = np.random.default_rng(2).integers(0, 256, (20, 30, 3)).astype(np.uint8)
  write_png(tmp_path / "big.png", rgb)
  got = image_io.load_pixels(tmp_path / "big.png", CFG)
  expected = Image.fromarray(rgb).convert("L").resize((8, 8), Image.Resampling.BICUBIC)
  np.testing.assert_array_equal(got[..., 0], np.asarray(expected, np.float32) / 255)
  write_png(tmp_path / "photo.jpg", rgb)           # JPEG decodes too (lossy, so only the shape)
  assert image_io.load_pixels(tmp_path / "photo.jpg", CFG).shape == (8, 8, 1)


def test_bad_image_files(tmp_path):
  (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).bytes(300))
  write_png(tmp_path / "ok.png", np.zeros((8, 8), np.uint8))
  whole = (tmp_path / "ok.png").read_bytes()
  (tmp_path / "cut.png").write_bytes(whole[:len(whole) // 2])
  for name, needle in [("noise.png", "cannot decode image"), ("cut.png", "cannot decode image"),
                       ("missing.png", "file not found")]:
    with pytest.raises(image_io.MediaError, match=needle):
      image_io.load_patches(tmp_path / name, CFG)


def test_layout_checks():
  with pytest.raises(ValueError, match="data.image_patch=3 must divide data.image_side=8"):
    image_io.check_layout(dataclasses.replace(CFG, image_patch=3))
  with pytest.raises(ValueError, match="image_channels"):
    image_io.check_layout(dataclasses.replace(CFG, image_channels=2))


# --- audio ------------------------------------------------------------------------------------

@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("channels", [1, 2])
def test_wav_pcm_widths_and_channels(tmp_path, width, channels):
  rng = np.random.default_rng(width * 10 + channels)
  scale = float(1 << (8 * width - 1))
  x = np.round(rng.uniform(-0.9, 0.9, (500, channels)) * scale) / scale   # exactly representable
  write_wav(tmp_path / "a.wav", x, 11025, width=width)
  samples, rate = audio_io.read_wav(tmp_path / "a.wav")
  assert rate == 11025 and samples.dtype == np.float32
  np.testing.assert_allclose(samples, x.mean(axis=1), rtol=0, atol=1e-7)


def test_wav_24_bit(tmp_path):
  ints = np.array([0, 1, -1, (1 << 23) - 1, -(1 << 23), 12345, -54321])
  raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints)
  import wave
  with wave.open(str(tmp_path / "a.wav"), "wb") as w:
    w.setnchannels(1), w.setsampwidth(3), w.setframerate(8000), w.writeframes(raw)
  samples, _ = audio_io.read_wav(tmp_path / "a.wav")
  np.testing.assert_array_equal(samples, (ints / float(1 << 23)).astype(np.float32))


def test_bad_wav_files(tmp_path):
  (tmp_path / "text.wav").write_text("this is not a wav file")
  write_wav(tmp_path / "ok.wav", np.zeros(4000), 8000)
  whole = (tmp_path / "ok.wav").read_bytes()
  (tmp_path / "cut.wav").write_bytes(whole[:2000])
  write_wav(tmp_path / "short.wav", np.zeros(100), 8000)
  for name, needle in [("text.wav", "unreadable WAV"), ("cut.wav", "truncated"),
                       ("missing.wav", "file not found"), ("short.wav", "audio too short")]:
    with pytest.raises(image_io.MediaError, match=needle):
      audio_io.load_frames(tmp_path / name, CFG)


@pytest.mark.parametrize("rate_in", [4000, 16000, 44100])
def test_resample_keeps_a_tone_and_removes_what_would_alias(rate_in):
  t = np.arange(rate_in) / rate_in
  y = audio_io.resample(np.sin(2 * np.pi * 1000 * t), rate_in, 8000)
  assert len(y) == 8000
  reference = np.sin(2 * np.pi * 1000 * np.arange(8000) / 8000)
  np.testing.assert_allclose(y[200:-200], reference[200:-200], atol=2e-3)
  if rate_in > 8000:   # 5 kHz is above the new Nyquist (4 kHz): it must not fold down to 3 kHz
    high = audio_io.resample(np.sin(2 * np.pi * 5000 * t), rate_in, 8000)
    assert np.abs(high[200:-200]).max() < 0.01


def test_wav_frames_are_the_default_log_mel(tmp_path):
  tone = dtmf.synthesize(3, np.random.default_rng(0), CFG)          # 8 kHz, as data.sample_rate
  write_wav(tmp_path / "t.wav", tone, CFG.sample_rate)
  frames = audio_io.load_frames(tmp_path / "t.wav", CFG)
  quantized = np.round(np.clip(tone, -1, 1) * 32768).clip(-32768, 32767) / 32768
  np.testing.assert_array_equal(frames, log_mel_lib.log_mel(quantized.astype(np.float32), CFG))
  assert frames.shape == (dtmf.num_frames(CFG), CFG.n_mels)


# --- records ----------------------------------------------------------------------------------

def test_record_bytes_round_trip():
  rng = np.random.default_rng(0)
  rec = records.Record((b"see ", records.ImagePart(rng.random((16, 4), np.float32), (4, 4)),
                        "é".encode(), records.AudioPart(rng.random((3, 24), np.float32))),
                       eos=False, line=12)
  back = records.decode(records.encode(rec))
  assert back.eos is False and back.line == 12 and len(back.parts) == 4
  assert back.parts[0] == b"see " and back.parts[2] == "é".encode()
  np.testing.assert_array_equal(back.parts[1].patches_MxD, rec.parts[1].patches_MxD)
  assert back.parts[1].grid == (4, 4)
  np.testing.assert_array_equal(back.parts[3].frames_MxD, rec.parts[3].frames_MxD)
  assert records.num_tokens(rec) == 1 + 4 + 16 + 2 + 3   # BOS, parts, no EOS

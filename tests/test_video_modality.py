"""Video as the fourth row of the modality table: vocabulary, embedder, router telemetry, balance
bias, loss weights, metric keys and the report's heatmap all gain a video column from the table."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnimoe.data.config import DataConfig, feature_dim
from omnimoe.data.packing import loss_weight_table
from omnimoe.data.vocab import Vocab
from omnimoe.model import modality
from omnimoe.model.config import MoEConfig
from omnimoe.model.embed import MultimodalEmbed
from omnimoe.model.router import balance_stats, init_router_state, update_bias
from omnimoe.train import loop, report


def test_video_is_code_4_and_embedded_from_features():
  assert modality.VIDEO.code == 4 and modality.BY_NAME["video"] is modality.VIDEO
  assert modality.NAMES == ("text", "image", "audio", "video")
  assert modality.VIDEO in modality.MEDIA


def test_video_codes_follow_the_audio_codes_in_the_vocabulary():
  v = Vocab(image_codes=5, audio_codes=7, video_codes=3)
  # Written out: 4 specials, 256 bytes, then 5 image, 7 audio, 3 video codes.
  assert (v.image_offset, v.audio_offset, v.video_offset, v.used_size) == (260, 265, 272, 275)
  ids = np.arange(0, 276)
  expected = np.array([0] * 4 + [1] * 256 + [2] * 5 + [3] * 7 + [4] * 3 + [4], np.int8)
  np.testing.assert_array_equal(v.modality_of(ids), expected)
  np.testing.assert_array_equal(v.video_ids(np.array([0, 2])), [272, 274])
  # The default config keeps the vocabulary size of the run without video (512 rows).
  assert Vocab.from_config(DataConfig()).size == 512


def test_video_loss_weight_and_feature_width_come_from_the_config():
  cfg = DataConfig(loss_weight_video=0.25, video_patch=4, video_tubelet=2)
  np.testing.assert_array_equal(loss_weight_table(cfg), [0.0, 1.0, 0.0, 1.0, 0.25])
  assert feature_dim(cfg) == 2 * 4 * 4   # a tubelet of two 4x4 patches is the widest vector
  assert feature_dim(DataConfig()) == 24  # n_mels: unchanged for the default run


def test_a_video_position_uses_its_own_embedder():
  F, D = 6, 8
  embed = MultimodalEmbed(32, F, D, rngs=nnx.Rngs(0))
  embed.bias_MxD[...] = jax.random.normal(jax.random.key(1), embed.bias_MxD[...].shape)
  feats = np.random.default_rng(0).normal(size=(1, 4, F)).astype(np.float32)
  mods = np.array([[1, 2, 3, 4]])
  out = np.asarray(embed(jnp.array([[5, 0, 0, 0]]), jnp.asarray(feats), jnp.asarray(mods)))
  proj = np.asarray(embed.proj_MxFxD[...], np.float64)
  bias = np.asarray(embed.bias_MxD[...], np.float64)
  assert proj.shape[0] == 3
  for pos, row in ((1, 0), (2, 1), (3, 2)):   # image, audio, video rows of MEDIA
    np.testing.assert_allclose(out[0, pos], feats[0, pos] @ proj[row] + bias[row], rtol=1e-5,
                               atol=1e-5)
  np.testing.assert_allclose(out[0, 0], np.asarray(embed.table_VxD[...])[5], rtol=1e-6)


def test_router_statistics_have_a_video_column():
  T, E, K = 40, 4, 2
  r = np.random.default_rng(0)
  logits = r.normal(size=(T, E)).astype(np.float32)
  expert = np.stack([r.permutation(E)[:K] for _ in range(T)])
  mods = r.integers(1, 5, T)
  valid = r.random(T) < 0.9
  aux = balance_stats(jnp.asarray(logits), jax.nn.softmax(jnp.asarray(logits)),
                      jnp.asarray(expert), jnp.asarray(valid), jnp.asarray(mods))
  assert aux["expert_load_by_modality"].shape == (4, E)
  # Oracle: a loop over the video tokens.
  counts = np.zeros(E)
  for t in range(T):
    if valid[t] and mods[t] == 4:
      for e in expert[t]:
        counts[e] += 1
  np.testing.assert_allclose(aux["expert_load_by_modality"][3], counts / counts.sum(), rtol=1e-6)
  np.testing.assert_allclose(aux["active_fraction_by_modality"][3], K / E, rtol=1e-6)
  co = np.zeros((E, E))
  for t in range(T):
    if valid[t] and mods[t] == 4:
      for i in expert[t]:
        for j in expert[t]:
          co[i, j] += 1
  np.testing.assert_allclose(aux["coactivation_by_modality"][3], co)


def test_balance_bias_has_a_video_row_that_moves_on_its_own():
  state = init_router_state(2, MoEConfig(num_experts=4, bias_update_rate=0.01))
  assert state["bias"].shape == (2, 4, 4)
  load = jnp.zeros((2, 4, 4)).at[:, 3].set(jnp.asarray([0.7, 0.1, 0.1, 0.1]))   # video only
  new = np.asarray(update_bias(state["bias"], load, 0.01))
  np.testing.assert_allclose(new[:, 3], [[-0.01, 0.01, 0.01, 0.01]] * 2)
  np.testing.assert_allclose(new[:, :3], 0.0)   # no text/image/audio tokens: unchanged


def test_metric_keys_and_heatmap_gain_video(tmp_path):
  L, E = 1, 4
  load = np.zeros((L, 4, E), np.float32)
  load[0, 0] = [0.25] * 4
  load[0, 3] = [0.5, 0.5, 0.0, 0.0]
  raw = {"moe_layers": np.array([1]), "expert_load": np.full((L, E), 0.25),
         "expert_load_by_modality": load, "active_fraction": np.array([0.5]),
         "router_entropy": np.array([1.0]), "dropped_fraction": np.array([0.0]),
         "active_fraction_by_modality": np.array([[0.5, 0, 0, 0.25]]),
         "router_entropy_by_modality": np.array([[1.0, 0, 0, 0.5]])}
  out = loop._moe_metrics(raw)
  assert out["moe/active_fraction/video"] == 0.25
  np.testing.assert_array_equal(out["moe/expert_load/video/layer_1"], [0.5, 0.5, 0.0, 0.0])
  assert "moe/expert_load/image/layer_1" not in out   # no image tokens: no keys
  rows = [{"step": 1, **{k: (v.tolist() if isinstance(v, np.ndarray) else v)
                         for k, v in out.items()}}]
  loads, steps = report.expert_load(rows)
  assert report._modalities(loads[1]) == ["text", "video"]
  assert report.plot_expert_load(loads, steps, tmp_path / "load.png").is_file()


def test_causality_holds_with_a_clip_in_the_row():
  """Gradients of each position's output with respect to every input feature: nothing later in
  the row and nothing of another document reaches it, with video and audio interleaved on one
  clock (the positions of data/video_layout.py)."""
  from omnimoe.data.examples import make_sequence
  from omnimoe.data.packing import pack
  from omnimoe.data.video_layout import Clock, clip_media
  from omnimoe.model.config import ModelConfig
  from omnimoe.model.decoder import Decoder
  V, F = 64, 6
  bytes_vocab = Vocab.from_config(DataConfig())
  cfg = ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                    rope_sections=(2, 1, 1), attention_block=8,
                    moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32, block_rows=8))
  r = np.random.default_rng(0)
  clip = clip_media(r.integers(0, V, (3, 2)), r.normal(size=(3, 2, 4)), (1, 2),
                    r.integers(0, V, 4), r.normal(size=(4, 5)), Clock(100, 75, 100, 200), F)
  first = make_sequence([clip, np.array([7, 8])], F, specials=bytes_vocab)
  second = make_sequence([np.array([9, 10, 11])], F, specials=bytes_vocab)
  batch = pack([[first, second]], 24, F, np.ones(5, np.float32))
  assert (batch["modality"] == 4).sum() == 6 and (batch["modality"] == 3).sum() == 4
  model = Decoder(cfg, vocab_size=V, feature_dim=F, rngs=nnx.Rngs(0))
  proj = jax.random.normal(jax.random.key(5), (V,))

  def out(features):
    return model(dict(batch, features=features))[0][0] @ proj      # [L]
  jac = np.abs(np.asarray(jax.jit(jax.jacrev(out))(jnp.asarray(batch["features"])))).sum(-1)[:, 0]
  seg = batch["segment_ids"][0]
  for i in range(24):
    for j in range(24):
      if seg[i] == 0 or j > i or seg[j] != seg[i]:
        assert jac[i, j] == 0.0, (i, j)
    if batch["modality"][0, i] >= 2:   # media read their features (text: the table)
      assert jac[i, i] > 0
  audio = np.flatnonzero(batch["modality"][0] == 3)
  video = np.flatnonzero(batch["modality"][0] == 4)
  assert jac[audio[-1], video[0]] > 0       # sound sees the frames before it

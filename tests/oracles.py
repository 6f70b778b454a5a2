"""Slow, obvious references that tests compare the fast code against (never the code under test)."""
import functools

import numpy as np


def patchify_loop(pixels_HxW: np.ndarray, patch: int) -> np.ndarray:
  """[rows*cols, patch*patch]: patch (r, c) at row r*cols + c, its pixels row by row, by loops."""
  h, w = pixels_HxW.shape
  out = []
  for r in range(h // patch):
    for c in range(w // patch):
      out.append([pixels_HxW[r * patch + i, c * patch + j]
                  for i in range(patch) for j in range(patch)])
  return np.asarray(out, np.float32)


def digit_patches(index: int, patch: int = 4) -> np.ndarray:
  """sklearn digit `index` as an 8-bit image file holds it (round(v * 255 / 16) / 255), patchified."""
  values = _digit_values()[index]
  pixels = np.rint(values * 255 / 16).astype(np.float32) / np.float32(255)
  return patchify_loop(pixels, patch)


@functools.lru_cache(maxsize=1)
def _digit_values() -> np.ndarray:
  from sklearn.datasets import load_digits
  return load_digits().images


def byte_pieces(doc: bytes, max_bytes: int) -> list[tuple[bytes, bool]]:
  """A document cut into pieces of at most `max_bytes` bytes: (piece, ends the document)."""
  starts = list(range(0, len(doc), max_bytes))
  return [(doc[s:s + max_bytes], s == starts[-1]) for s in starts]


def attention_oracle(q, k, v, seg, order, r, window=None):
  """Float64 causal segment-masked GQA attention by dense numpy: query i sees key j iff
  order[j] <= order[i] and seg[i] == seg[j] > 0 (and order[i] - order[j] < window, if given).
  Returns out and d(sum(out * r))/d(q, k, v)."""
  q, k, v, r = (np.asarray(a, np.float64) for a in (q, k, v, r))
  seg, order = np.asarray(seg), np.asarray(order)
  h, kv, d = q.shape[2], k.shape[2], q.shape[3]
  out, dq = np.zeros(q.shape), np.zeros(q.shape)
  dk, dv = np.zeros(k.shape), np.zeros(v.shape)
  for b in range(q.shape[0]):
    vis = ((order[b][None, :] <= order[b][:, None]) & (seg[b][None, :] == seg[b][:, None])
           & (seg[b][:, None] > 0))
    if window is not None:
      vis &= order[b][:, None] - order[b][None, :] < window
    for hh in range(h):
      kh = hh // (h // kv)
      s = np.where(vis, q[b, :, hh] @ k[b, :, kh].T / np.sqrt(d), -np.inf)
      e = np.where(vis, np.exp(s - np.where(vis.any(1), s.max(1), 0.0)[:, None]), 0.0)
      p = e / np.maximum(e.sum(1, keepdims=True), 1e-300)
      out[b, :, hh] = p @ v[b, :, kh]
      dp = r[b, :, hh] @ v[b, :, kh].T
      ds = p * (dp - (p * dp).sum(1, keepdims=True)) / np.sqrt(d)
      dq[b, :, hh] = ds @ k[b, :, kh]
      dk[b, :, kh] += ds.T @ q[b, :, hh]
      dv[b, :, kh] += p.T @ r[b, :, hh]
  return out, (dq, dk, dv)


def dynamic_experts_taken(x_TxD, router_DxE, threshold: float, k_min: int, k_max: int) -> np.ndarray:
  """How many experts each token takes under the dynamic router (DESIGN.md), by a float64 loop:
  softmax of x @ router, then experts by descending probability until the mass taken reaches
  `threshold`, at least k_min and at most k_max of them. int [T]."""
  logits = np.asarray(x_TxD, np.float64) @ np.asarray(router_DxE, np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  taken = []
  for row in probs:
    mass, n = 0.0, 0
    for p in sorted(row, reverse=True):
      if n == k_max or (n >= k_min and mass >= threshold):
        break
      mass, n = mass + p, n + 1
    taken.append(n)
  return np.asarray(taken)


def active_fractions(taken_T, num_experts: int, segment_ids_T, modality_T):
  """(mean experts taken / E over the valid tokens (segment id > 0), the same per modality code
  1, 2, 3, 4 (text, image, audio, video; 0 where a modality has no valid token)) by plain numpy."""
  taken_T, seg_T, mod_T = (np.asarray(a).reshape(-1) for a in (taken_T, segment_ids_T, modality_T))
  frac_T = taken_T / num_experts
  valid = seg_T > 0
  by_modality = [frac_T[valid & (mod_T == code)].mean() if np.any(valid & (mod_T == code)) else 0.0
                 for code in (1, 2, 3, 4)]
  return frac_T[valid].mean(), np.asarray(by_modality)


def moe_inputs(graphdef, params, batch, router=None) -> list:
  """What each MoE layer receives when the model (`nnx.merge(graphdef, params)`) runs `batch`:
  [(x_BxLxD, segment_ids_BxL, modality_BxL, threshold)] as numpy, one per MoE layer in order."""
  import jax
  return jax.tree.map(np.asarray, _moe_inputs_fn(graphdef)(params, batch, router))


@functools.cache
def _moe_inputs_fn(graphdef):
  """The jitted model run returning its MoE layers' arguments: while it is traced, MoE.__call__ is
  wrapped to record them (nothing else changes)."""
  from unittest import mock

  import jax
  from flax import nnx
  from omnimoe.model.moe import MoE

  original = MoE.__call__

  def run(params, batch, router):
    seen = []

    def spy(self, x, segment_ids, modality=None, *, threshold=None, bias_MxE=None):
      seen.append((x, segment_ids, modality, threshold))
      return original(self, x, segment_ids, modality, threshold=threshold, bias_MxE=bias_MxE)

    with mock.patch.object(MoE, "__call__", spy):
      nnx.merge(graphdef, params)(batch, router)
    return seen

  return jax.jit(run)


def recount_active_fractions(cfg, setup, state, batch):
  """Per MoE layer of a dynamic-router model (train state `state`, built by `setup`), the active
  fraction [M] and its split by modality [M, 4], recounted from what each layer receives on
  `batch` with `dynamic_experts_taken`, at the state's router thresholds."""
  moe = cfg.model.moe
  inputs = moe_inputs(setup.graphdef, state["params"], batch, state["router"])
  fracs, by_modality = [], []
  for m, (x, segment_ids, modality, threshold) in enumerate(inputs):
    block = state["params"]["blocks"][cfg.model.num_dense_layers + m]
    taken = dynamic_experts_taken(x.reshape(-1, x.shape[-1]), np.asarray(block["moe"]["router_DxE"]),
                                  float(threshold), moe.k_min, moe.k_max)
    frac, per_modality = active_fractions(taken, moe.num_experts, segment_ids, modality)
    fracs.append(frac)
    by_modality.append(per_modality)
  return np.asarray(fracs), np.asarray(by_modality)


def wav_samples(path) -> tuple[np.ndarray, int]:
  """(float64 mono samples, sample rate) of a 16-bit PCM WAV file, read by hand (RIFF chunks,
  little-endian int16 / 32768, channels averaged), not through the `wave` module."""
  import struct
  raw = open(path, "rb").read()
  assert raw[:4] == b"RIFF" and raw[8:12] == b"WAVE", path
  at, fmt, samples = 12, None, None
  while at + 8 <= len(raw):
    kind, size = raw[at:at + 4], struct.unpack("<I", raw[at + 4:at + 8])[0]
    body = raw[at + 8:at + 8 + size]
    if kind == b"fmt ":
      fmt = struct.unpack("<HHIIHH", body[:16])   # format, channels, rate, byte rate, align, bits
    elif kind == b"data":
      samples = np.frombuffer(body, "<i2").astype(np.float64) / 32768
    at += 8 + size + size % 2
  pcm, channels, rate, _, _, bits = fmt
  assert pcm == 1 and bits == 16, fmt
  return samples.reshape(-1, channels).mean(axis=1), rate


def mel_band_of(hz: float, sample_rate: int, n_mels: int) -> int:
  """The HTK-mel band (of n_mels spaced evenly in mel from 0 to Nyquist) centred nearest `hz`."""
  mel = lambda f: 2595 * np.log10(1 + np.asarray(f) / 700)
  centres_mel = np.linspace(0, mel(sample_rate / 2), n_mels + 2)[1:-1]
  return int(np.abs(centres_mel - mel(hz)).argmin())


def routed_expert_sets(x_TxD, router_DxE, *, top_k: int | None = None, threshold: float = 0.0,
                       k_min: int = 1, k_max: int = 0) -> list[set]:
  """The experts each token takes, by a float64 loop over tokens: softmax of x @ router, then the
  top_k most probable (router topk), or with `top_k` None experts by descending probability until
  their mass reaches `threshold`, at least k_min and at most k_max (router dynamic)."""
  logits = np.asarray(x_TxD, np.float64) @ np.asarray(router_DxE, np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  sets = []
  for row in probs:
    order = sorted(range(len(row)), key=lambda e: -row[e])
    if top_k is not None:
      sets.append(set(order[:top_k]))
      continue
    mass, taken = 0.0, set()
    for e in order:
      if len(taken) == k_max or (len(taken) >= k_min and mass >= threshold):
        break
      mass += row[e]
      taken.add(e)
    sets.append(taken)
  return sets


def recount_coactivation(sets: list[set], segment_ids_T, modality_T, num_experts: int,
                         num_modalities: int = 4) -> np.ndarray:
  """[4, E, E] by loops (text, image, audio, video): [m, i, j] += 1 for every valid token (segment
  id > 0) of modality code m + 1 and every ordered pair (i, j) of the experts it took (i == j
  included)."""
  out = np.zeros((num_modalities, num_experts, num_experts))
  for taken, seg, mod in zip(sets, np.asarray(segment_ids_T).reshape(-1),
                             np.asarray(modality_T).reshape(-1)):
    if seg > 0 and 1 <= mod <= num_modalities:
      for i in taken:
        for j in taken:
          out[mod - 1, i, j] += 1
  return out

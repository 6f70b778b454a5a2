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

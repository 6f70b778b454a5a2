"""Codebooks: k-means++ seeding and a few Lloyd iterations, in numpy, deterministic given a seed."""
import numpy as np


def _sq_distances(x_NxD: np.ndarray, centers_KxD: np.ndarray) -> np.ndarray:
  return ((x_NxD ** 2).sum(1)[:, None] - 2.0 * x_NxD @ centers_KxD.T
          + (centers_KxD ** 2).sum(1)[None, :])


def assign(x_NxD: np.ndarray, centers_KxD: np.ndarray) -> np.ndarray:
  """int32 [N]: index of the nearest center of each row."""
  return _sq_distances(x_NxD, centers_KxD).argmin(1).astype(np.int32)


def fit(x_NxD: np.ndarray, k: int, seed: int, iterations: int = 20) -> np.ndarray:
  """float32 [k, D] centers; fewer distinct points than k leaves duplicate centers (never NaN)."""
  x = np.asarray(x_NxD, np.float64)
  rng = np.random.default_rng(seed)
  centers = np.empty((k, x.shape[1]))
  centers[0] = x[rng.integers(len(x))]
  nearest = ((x - centers[0]) ** 2).sum(1)
  for j in range(1, k):                       # k-means++: sample far points
    total = nearest.sum()
    idx = rng.choice(len(x), p=nearest / total) if total > 0 else rng.integers(len(x))
    centers[j] = x[idx]
    nearest = np.minimum(nearest, ((x - centers[j]) ** 2).sum(1))
  for _ in range(iterations):                 # Lloyd
    labels = assign(x, centers)
    counts = np.bincount(labels, minlength=k)
    sums = np.zeros_like(centers)
    np.add.at(sums, labels, x)
    occupied = counts > 0
    centers[occupied] = sums[occupied] / counts[occupied, None]
  return centers.astype(np.float32)

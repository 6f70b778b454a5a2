"""k-means codebooks: recovers separated clusters, deterministic per seed, no NaN on duplicates."""
import numpy as np

from omnimoe.data.prepare import kmeans


def test_recovers_separated_clusters():
  rng = np.random.default_rng(0)
  true_centers = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], np.float64)
  x = np.concatenate([c + 0.1 * rng.standard_normal((200, 2)) for c in true_centers])
  centers = kmeans.fit(x, 4, seed=0)
  found = sorted(map(tuple, np.round(centers).astype(int).tolist()))
  assert found == [(0, 0), (0, 10), (10, 0), (10, 10)]
  labels = kmeans.assign(x, centers)
  assert labels.dtype == np.int32
  assert all(len(np.unique(labels[i * 200:(i + 1) * 200])) == 1 for i in range(4))


def test_deterministic_per_seed():
  x = np.random.default_rng(1).standard_normal((500, 3))
  np.testing.assert_array_equal(kmeans.fit(x, 8, seed=5), kmeans.fit(x, 8, seed=5))
  assert not np.array_equal(kmeans.fit(x, 8, seed=5), kmeans.fit(x, 8, seed=6))


def test_fewer_distinct_points_than_codes():
  x = np.repeat(np.array([[0.0, 1.0], [2.0, 3.0]]), 10, axis=0)
  centers = kmeans.fit(x, 5, seed=0)
  assert np.all(np.isfinite(centers))
  assert {tuple(c) for c in centers.tolist()} == {(0.0, 1.0), (2.0, 3.0)}

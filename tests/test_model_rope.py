"""M-RoPE: norm-preserving, equals 1-D RoPE when t = h = w, depends only on relative position."""
import jax
import jax.numpy as jnp
import numpy as np

from omnimoe.model.rope import apply_rope, rope_angles

DH, SECTIONS, THETA = 16, (4, 2, 2), 10000.0


def _rope(x, pos_Lx3):
  return apply_rope(x, rope_angles(jnp.asarray(pos_Lx3)[None], DH, SECTIONS, THETA))


def test_rotation_preserves_norm():
  x = jax.random.normal(jax.random.key(0), (1, 7, 3, DH))
  pos = jax.random.randint(jax.random.key(1), (7, 3), 0, 100)
  np.testing.assert_allclose(jnp.linalg.norm(_rope(x, pos), axis=-1),
                             jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_equal_components_is_1d_rope():
  """Reference: Llama-style 1-D RoPE, pairs (i, i + DH/2), frequency theta^(-2i/DH)."""
  x = np.asarray(jax.random.normal(jax.random.key(2), (1, 9, 2, DH)), np.float64)
  idx = np.arange(9) * 3
  freq = THETA ** (-np.arange(DH // 2) * 2.0 / DH)
  ang = idx[:, None] * freq[None]
  cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
  x1, x2 = x[..., :DH // 2], x[..., DH // 2:]
  want = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
  got = _rope(jnp.asarray(x, jnp.float32), np.repeat(idx[:, None], 3, 1))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dot_product_depends_only_on_offset():
  kq, kk = jax.random.split(jax.random.key(3))
  q = jax.random.normal(kq, (1, 1, 1, DH))
  k = jax.random.normal(kk, (1, 1, 1, DH))
  pq, pk = np.array([[5, 2, 7]]), np.array([[1, 4, 3]])
  base = jnp.sum(_rope(q, pq) * _rope(k, pk))
  for shift in ([10, 0, 0], [0, 3, 0], [4, 9, 11]):
    shifted = jnp.sum(_rope(q, pq + shift) * _rope(k, pk + shift))
    np.testing.assert_allclose(shifted, base, rtol=1e-5, atol=1e-5)
  # ...and does change with the offset (the test can fail).
  assert abs(float(jnp.sum(_rope(q, pq + [0, 1, 0]) * _rope(k, pk))) - float(base)) > 1e-3


def test_sections_use_their_own_component():
  """Changing only h rotates only the h pairs (4..5 and their partners 12..13)."""
  x = jax.random.normal(jax.random.key(4), (1, 1, 1, DH))
  a = np.asarray(_rope(x, np.array([[3, 5, 8]])))[0, 0, 0]
  b = np.asarray(_rope(x, np.array([[3, 6, 8]])))[0, 0, 0]
  changed = np.nonzero(np.abs(a - b) > 1e-7)[0].tolist()
  assert changed == [4, 5, 12, 13]

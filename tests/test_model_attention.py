"""attend: blockwise == xla == a naive per-query reference, with packed segments and padding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimoe.model.attention import attend, resolve_implementation

B, L, H, KV, D = 2, 50, 4, 2, 8


def _inputs():
  kq, kk, kv, kr = jax.random.split(jax.random.key(0), 4)
  seg = np.zeros((B, L), np.int32)
  seg[0, :20], seg[0, 20:45] = 1, 2           # two documents, 5 padding positions
  seg[1, :30], seg[1, 30:33], seg[1, 33:40] = 1, 2, 3
  return (jax.random.normal(kq, (B, L, H, D)), jax.random.normal(kk, (B, L, KV, D)),
          jax.random.normal(kv, (B, L, KV, D)), jnp.asarray(seg),
          jax.random.normal(kr, (B, L, H, D)))


def _naive(q, k, v, seg):
  q, k, v, seg = (np.asarray(a, np.float64) for a in (q, k, v, seg))
  out = np.zeros(q.shape)
  for b in range(B):
    for i in range(L):
      if seg[b, i] == 0:
        continue
      keys = [j for j in range(i + 1) if seg[b, j] == seg[b, i]]
      for h in range(H):
        kh = h // (H // KV)
        s = np.array([q[b, i, h] @ k[b, j, kh] for j in keys]) / np.sqrt(D)
        p = np.exp(s - s.max())
        out[b, i, h] = (p / p.sum()) @ v[b, keys, kh]
  return out


def _run(impl, block):
  q, k, v, seg, r = _inputs()

  def loss(q, k, v):
    o = attend(q, k, v, seg, implementation=impl, block=block)
    return jnp.sum(o * r), o
  return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)


def test_xla_matches_naive_reference():
  q, k, v, seg, _ = _inputs()
  np.testing.assert_allclose(attend(q, k, v, seg, implementation="xla"), _naive(q, k, v, seg),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [16, 7, 64])
def test_blockwise_matches_xla_forward_and_grads(block):
  (_, o0), g0 = _run("xla", block)
  (_, o1), g1 = _run("blockwise", block)
  np.testing.assert_allclose(o1, o0, rtol=1e-5, atol=1e-5)
  for a, b, name in zip(g1, g0, "qkv"):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_padding_rows_are_zero_and_finite(impl):
  (_, o), grads = _run(impl, 16)
  _, _, _, seg, _ = _inputs()
  assert np.all(np.isfinite(o)) and all(np.all(np.isfinite(g)) for g in grads)
  pad = np.asarray(seg) == 0
  assert np.all(np.asarray(o)[pad] == 0)
  # Padding keys/values get no gradient: nothing valid attends to them.
  assert np.all(np.asarray(grads[1])[pad] == 0) and np.all(np.asarray(grads[2])[pad] == 0)


def test_auto_and_errors():
  assert resolve_implementation("auto", 128, jnp.float32, 128) == "xla"
  assert resolve_implementation("auto", 256, jnp.float32, 128) == "blockwise"
  q, k, v, seg, _ = _inputs()
  with pytest.raises(ValueError, match="cudnn"):
    attend(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), seg,
           implementation="cudnn")
  with pytest.raises(ValueError, match="unknown attention"):
    attend(q, k, v, seg, implementation="flash")

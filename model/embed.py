"""Input embedding of the unified sequence.

Text and specials (modality 0 pad, 1 text) look up `tokens` in a table over the vocabulary;
image (2) and audio (3) positions project their continuous `features` with a per-modality linear
embedder plus a learned per-modality bias. The modality picks which one each position gets.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from model.sharding import constrain, param

IMAGE, AUDIO = 2, 3


class MultimodalEmbed(nnx.Module):

  def __init__(self, vocab_size: int, feature_dim: int, d_model: int, *, dtype="float32",
               param_dtype="float32", rngs: nnx.Rngs):
    normal = jax.nn.initializers.normal
    self.dtype = jnp.dtype(dtype)
    self.table_VxD = param(rngs, normal(1.0), (vocab_size, d_model), ("vocab", "embed"),
                           param_dtype)
    # Row 0: image embedder, row 1: audio embedder.
    self.proj_MxFxD = param(rngs, normal(feature_dim ** -0.5), (2, feature_dim, d_model),
                            (None, None, "embed"), param_dtype)
    self.bias_MxD = param(rngs, jax.nn.initializers.zeros, (2, d_model), (None, "embed"),
                          param_dtype)

  def __call__(self, tokens_BxL, features_BxLxF, modality_BxL) -> jax.Array:
    # Gather the FSDP-sharded width first: a row lookup cannot use `fsdp` for both the table's width
    # and the tokens' batch (GSPMD would replicate everything).
    table_VxD = constrain(self.table_VxD[...], ("vocab", None))
    text_BxLxD = jnp.take(table_VxD, tokens_BxL, axis=0).astype(self.dtype)
    proj = self.proj_MxFxD[...].astype(self.dtype)
    bias = self.bias_MxD[...].astype(self.dtype)
    feats = features_BxLxF.astype(self.dtype)
    image_BxLxD = feats @ proj[0] + bias[0]
    audio_BxLxD = feats @ proj[1] + bias[1]
    m = modality_BxL[..., None]
    return jnp.where(m == IMAGE, image_BxLxD, jnp.where(m == AUDIO, audio_BxLxD, text_BxLxD))

"""Input embedding of the unified sequence.

Text and specials (modalities pad and text) look up `tokens` in a table over the vocabulary;
media positions (`modality.MEDIA`: image, audio, video) project their continuous `features` with a
per-modality linear embedder plus a learned per-modality bias. The modality picks which one each
position gets.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from omnimoe.model.modality import MEDIA
from omnimoe.model.sharding import constrain, param


class MultimodalEmbed(nnx.Module):

  def __init__(self, vocab_size: int, feature_dim: int, d_model: int, *, dtype="float32",
               param_dtype="float32", rngs: nnx.Rngs):
    normal = jax.nn.initializers.normal
    self.dtype = jnp.dtype(dtype)
    self.table_VxD = param(rngs, normal(1.0), (vocab_size, d_model), ("vocab", "embed"),
                           param_dtype)
    # Row i embeds MEDIA[i] (image, audio, video).
    self.proj_MxFxD = param(rngs, normal(feature_dim ** -0.5), (len(MEDIA), feature_dim, d_model),
                            (None, None, "embed"), param_dtype)
    self.bias_MxD = param(rngs, jax.nn.initializers.zeros, (len(MEDIA), d_model), (None, "embed"),
                          param_dtype)

  def __call__(self, tokens_BxL, features_BxLxF, modality_BxL) -> jax.Array:
    # Gather the FSDP-sharded width first: a row lookup cannot use `fsdp` for both the table's width
    # and the tokens' batch (GSPMD would replicate everything).
    table_VxD = constrain(self.table_VxD[...], ("vocab", None))
    text_BxLxD = jnp.take(table_VxD, tokens_BxL, axis=0).astype(self.dtype)
    proj = self.proj_MxFxD[...].astype(self.dtype)
    bias = self.bias_MxD[...].astype(self.dtype)
    feats = features_BxLxF.astype(self.dtype)
    m = modality_BxL[..., None]
    out_BxLxD = text_BxLxD
    for i, media in enumerate(MEDIA):
      out_BxLxD = jnp.where(m == media.code, feats @ proj[i] + bias[i], out_BxLxD)
    return out_BxLxD

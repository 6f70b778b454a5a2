"""Packing examples into rows of length L: the batch contract.

Each row holds whole examples back to back (segment ids 1, 2, ...) and padding after them.
`targets` is the next token of the same segment (PAD at a segment's last position and on padding);
`loss_weights` is 0 there and otherwise the configured weight of the target's modality (0 on the
image codes of an example whose `image_loss` is False: data.image_loss).
"""
import numpy as np

from omnimoe.data.examples import Example
from omnimoe.model.modality import IMAGE, MODALITIES

BATCH_KEYS = ("tokens", "features", "modality", "segment_ids", "positions", "targets",
              "loss_weights")


def loss_weight_table(cfg) -> np.ndarray:
  """float32 [1 + modalities]: the loss weight of a target of each modality code (pad: 0; text,
  image, audio, video: data.loss_weight_<name>)."""
  return np.asarray([0.0] + [getattr(cfg, f"loss_weight_{m.name}") for m in MODALITIES],
                    np.float32)


def pack(rows: list[list[Example]], seq_len: int, feature_dim: int,
         loss_weight_by_modality: np.ndarray) -> dict[str, np.ndarray]:
  """Rows of examples -> batch dict (numpy, [B, L, ...]); each row's examples must fit in L.

  `loss_weight_by_modality` is float32 [1 + modalities] (`loss_weight_table`), by modality code.
  """
  b = len(rows)
  tokens = np.zeros((b, seq_len), np.int32)
  features = np.zeros((b, seq_len, feature_dim), np.float32)
  modality = np.zeros((b, seq_len), np.int8)
  segment_ids = np.zeros((b, seq_len), np.int32)
  positions = np.zeros((b, seq_len, 3), np.int32)
  image_loss = np.ones((b, seq_len), bool)
  for i, examples in enumerate(rows):
    if not examples:
      continue
    lengths = [len(e.tokens_N) for e in examples]
    n = sum(lengths)
    if n > seq_len:
      raise ValueError(f"examples of {n} tokens do not fit in a row of {seq_len}")
    tokens[i, :n] = np.concatenate([e.tokens_N for e in examples])
    features[i, :n] = np.concatenate([e.features_NxF for e in examples])
    modality[i, :n] = np.concatenate([e.modality_N for e in examples])
    positions[i, :n] = np.concatenate([e.positions_Nx3 for e in examples])
    segment_ids[i, :n] = np.repeat(np.arange(1, len(examples) + 1, dtype=np.int32), lengths)
    image_loss[i, :n] = np.repeat([e.image_loss for e in examples], lengths)

  has_next_BxL = np.zeros((b, seq_len), bool)
  has_next_BxL[:, :-1] = (segment_ids[:, :-1] == segment_ids[:, 1:]) & (segment_ids[:, :-1] > 0)
  targets = np.zeros((b, seq_len), np.int32)
  targets[:, :-1] = tokens[:, 1:]
  targets *= has_next_BxL
  next_modality_BxL = np.zeros((b, seq_len), np.int8)
  next_modality_BxL[:, :-1] = modality[:, 1:]
  loss_weights = np.where(has_next_BxL, loss_weight_by_modality[next_modality_BxL], 0.0)
  no_image_loss = np.zeros((b, seq_len), bool)
  no_image_loss[:, :-1] = ~image_loss[:, 1:] & (modality[:, 1:] == IMAGE.code)
  loss_weights = np.where(no_image_loss, 0.0, loss_weights)
  return dict(tokens=tokens, features=features, modality=modality, segment_ids=segment_ids,
              positions=positions, targets=targets,
              loss_weights=loss_weights.astype(np.float32))

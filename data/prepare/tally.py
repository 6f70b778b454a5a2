"""What a prepared folder's card counts (data/prepare/write.py): examples, media and tokens by kind."""
from omnimoe.data import records as records_lib


class Tally:
  """What the card counts."""

  def __init__(self, text_len=len):
    self.text_len = text_len
    self.text_bytes = 0
    self.examples = {"total": 0, "train": 0, "heldout": 0}
    self.with_modality = {"text": 0, "image": 0, "audio": 0, "video": 0}   # examples holding it
    self.media = {"image": 0, "audio": 0, "video": 0}          # image files, audio clips, videos
    self.tokens = {"text": 0, "image": 0, "audio": 0, "video": 0, "special": 0}
    self.records = {"train": 0, "heldout": 0}
    self.longest = 0

  def add(self, recs: list[records_lib.Record], split: str) -> None:
    self.examples["total"] += 1
    self.examples[split] += 1
    kinds = set()
    for rec in recs:
      self.records[split] += 1
      self.longest = max(self.longest, records_lib.num_tokens(rec, self.text_len))
      self.tokens["special"] += 1 + int(rec.eos)
      for part in rec.parts:
        kind = kind_of(part)
        kinds.add(kind)
        if kind == "video":   # a clip's sound counts as audio tokens
          self.tokens["audio"] += len(part.sound_AxD)
          self.tokens["video"] += records_lib.part_tokens(part) - len(part.sound_AxD)
        else:
          self.tokens[kind] += records_lib.part_tokens(part, self.text_len)
        if kind == "text":
          self.text_bytes += len(part)
        if kind != "text":
          self.media[kind] += 1
    for kind in kinds:
      self.with_modality[kind] += 1


def kind_of(part) -> str:
  if isinstance(part, bytes):
    return "text"
  if isinstance(part, records_lib.VideoPart):
    return "video"
  return "image" if isinstance(part, records_lib.ImagePart) else "audio"

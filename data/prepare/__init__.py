"""`omnimoe prepare`: a JSONL manifest of text, image and audio files becomes a prepared folder
(ArrayRecord shards of records, k-means codebooks, an index of lengths and splits, card.json).
`manifest` parses the lines; `image_io` and `audio_io` decode media into patches and log-mel frames
(`log_mel`); `kmeans` fits and assigns the codebooks; `write` builds a folder, `folder` reads one back.
Nothing here needs jax, and nothing here knows about the default dataset or the training pipeline.
"""

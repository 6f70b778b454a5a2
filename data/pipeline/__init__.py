"""The run's data: which prepared folders a run mixes and with what weights (`sources`), the global
example stream on grain with first-fit packing into batches, per-host sharding and a resumable state
(`mixture`), the held-out batches and the cross-modal evaluation sets (`prompts`, `heldout_text`), and
the public entry points the trainer calls (`api`, re-exported by `omnimoe.data`).
"""

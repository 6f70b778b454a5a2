"""One tiny trained run shared by the co-activation and placement tests (built once per session):
2 MoE layers of 8 experts, top-2, a checkpoint every step, one evaluation at step 2."""
import functools
import pathlib
import tempfile

from omnimoe.train import config as config_lib, loop

STEPS = 2
OVERRIDES = ["model.num_layers=2", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1",
             "model.head_dim=16", "model.rope_sections=[4,2,2]", "model.moe.num_experts=8",
             "model.moe.top_k=2", "model.moe.expert_hidden=16", "data.seq_len=64",
             "train.batch_size=8", "eval.batch_size=8", "eval.num_batches=2", "eval.image_limit=8",
             "eval.audio_limit=8", "eval.text_limit=1", "eval.max_new_tokens=2",
             f"train.steps={STEPS}", "checkpoint.every_steps=1", "checkpoint.keep=5",
             f"eval.every_steps={STEPS}", "checkpoint.async_save=false"]


def config(*extra):
  return config_lib.load(None, [*OVERRIDES, *extra])


@functools.cache
def trained_workdir() -> pathlib.Path:
  workdir = pathlib.Path(tempfile.mkdtemp(prefix="omnimoe-placement-")) / "run"
  loop.train(config(), workdir, progress=False)
  return workdir

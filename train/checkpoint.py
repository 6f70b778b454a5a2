"""orbax checkpoints of the train state and the data iterator: `<workdir>/checkpoints/<step>/`.

A checkpoint keeps its parameters' layer form: unrolled (`params.blocks[i]`) or, with
`model.scan_layers`, stacked (`params.moe_stack`, see model/decoder.py). Restoring one form into a
run of the other is refused in one line (a ConfigError naming `model.scan_layers`; the CLI exits 2).
A checkpoint from before video (2 media embedders, a balance bias over 3 modalities) is refused in
one line too: it is not converted."""
import pathlib

import jax
import orbax.checkpoint as ocp

from omnimoe.train.config import ConfigError
from omnimoe.train.state import Setup

STACKED = "moe_stack"   # the scanned MoE blocks' entry of `params` (model/decoder.py)


class Checkpoints:
  """Saves `{state, data}` every so often, keeps the newest `keep`, restores onto a given layout."""

  def __init__(self, directory: pathlib.Path, *, keep: int, async_save: bool):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict, data_state: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

  def restore(self, step: int, setup: Setup) -> tuple[dict, dict]:
    """The state at `step`, placed directly into `setup.shardings` (which may be another mesh)."""
    self._check_layer_form(step, setup)
    self._check_modalities(step, setup)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          setup.abstract_state, setup.shardings)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return out.state, out.data

  def _check_layer_form(self, step: int, setup: Setup) -> None:
    saved_tree = ocp.StandardCheckpointer().metadata(
        self.directory / str(step) / "state").item_metadata
    saved = STACKED in saved_tree["params"]
    wanted = STACKED in setup.abstract_state["params"]
    if saved != wanted:
      was, now = str(saved).lower(), str(wanted).lower()
      raise ConfigError(
          f"checkpoint {self.directory / str(step)} was written with model.scan_layers={was} "
          f"but this run has model.scan_layers={now}; set model.scan_layers={was} to restore it "
          "(the two parameter layouts are not converted)")

  def _check_modalities(self, step: int, setup: Setup) -> None:
    """Refuses a checkpoint whose per-modality arrays have another number of modalities."""
    saved_tree = ocp.StandardCheckpointer().metadata(
        self.directory / str(step) / "state").item_metadata

    def media_rows(tree) -> list[int]:
      rows = []
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if "proj_MxFxD" in jax.tree_util.keystr(path) and getattr(leaf, "shape", None):
          rows.append(int(leaf.shape[0]))
      return rows
    saved, wanted = media_rows(saved_tree["params"]), media_rows(setup.abstract_state["params"])
    if saved and wanted and saved != wanted:
      raise ConfigError(
          f"checkpoint {self.directory / str(step)} has embedders for {saved[0]} media; this "
          f"omnimoe has {wanted[0]} (video was added, docs/video.md): it is not converted, start a "
          "new workdir")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

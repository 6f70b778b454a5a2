"""orbax checkpoints of the train state and the data iterator: `<workdir>/checkpoints/<step>/`.

A checkpoint keeps its parameters' layer form: unrolled (`params.blocks[i]`) or, with
`model.scan_layers`, stacked (`params.moe_stack`, see model/decoder.py). Restoring one form into a
run of the other is refused in one line (a ConfigError naming `model.scan_layers`; the CLI exits 2).

A checkpoint written by `omnimoe import-hf` (step 0) holds neither the data iterator's state nor the
optimizer's: restoring it gives data state None (the run's data starts from the beginning) and a
fresh optimizer state.

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

  def save(self, step: int, state: dict, data_state: dict | None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, setup: Setup) -> tuple[dict, dict | None]:
    """The state at `step`, placed directly into `setup.shardings` (which may be another mesh),
    and the data iterator's state (None when the checkpoint has none)."""
    saved_tree = ocp.StandardCheckpointer().metadata(
        self.directory / str(step) / "state").item_metadata
    self._check_layer_form(step, saved_tree, setup)
    self._check_modalities(step, saved_tree, setup)
    # Started afresh when the checkpoint lacks them: the optimizer (an import) and the moving
    # average (train.ema_decay set on a run without one: it starts at the parameters). A moving
    # average the run no longer keeps is left on disk.
    fresh = {k for k in ("opt_state", "ema") if k in setup.abstract_state and k not in saved_tree}
    extra = "ema" in saved_tree and "ema" not in setup.abstract_state   # read like the params,
                                                                         # then dropped

    def kept(tree):
      out = {k: v for k, v in tree.items() if k not in fresh}
      return {**out, "ema": tree["params"]} if extra else out
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          kept(setup.abstract_state), kept(setup.shardings))
    items = {"state": ocp.args.StandardRestore(target)}
    has_data = (self.directory / str(step) / "data").exists()
    if has_data:
      items["data"] = ocp.args.JsonRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    state = {k: v for k, v in out.state.items() if not (extra and k == "ema")}
    if "opt_state" in fresh:
      init = jax.jit(setup.optimizer.init, out_shardings=setup.shardings["opt_state"])
      state = {**state, "opt_state": init(state["params"])}
    if "ema" in fresh:
      from omnimoe.train.state import placed_ema_start
      state = {**state, "ema": placed_ema_start(setup, state["params"])}
    return state, out.data if has_data else None

  def _check_layer_form(self, step: int, saved_tree, setup: Setup) -> None:
    saved = STACKED in saved_tree["params"]
    wanted = STACKED in setup.abstract_state["params"]
    if saved != wanted:
      was, now = str(saved).lower(), str(wanted).lower()
      raise ConfigError(
          f"checkpoint {self.directory / str(step)} was written with model.scan_layers={was} "
          f"but this run has model.scan_layers={now}; set model.scan_layers={was} to restore it "
          "(the two parameter layouts are not converted)")

  def _check_modalities(self, step: int, saved_tree, setup: Setup) -> None:
    """Refuses a checkpoint whose per-modality arrays have another number of modalities."""

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

"""orbax checkpoints of the train state and the data iterator: `<workdir>/checkpoints/<step>/`."""
import pathlib

import jax
import orbax.checkpoint as ocp

from omnimoe.train.state import Setup


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
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          setup.abstract_state, setup.shardings)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return out.state, out.data

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

"""The device mesh. The walking skeleton is data parallel over every device; the other axes exist
(size 1) so the logical-axis rules in `model.sharding` always resolve."""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "expert", "tensor", "context")
BATCH_AXES = ("data", "fsdp")


def make_mesh(devices=None) -> Mesh:
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(len(devices), 1, 1, 1, 1), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows of every batch array are split over the data-parallel axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(host_batch: dict, mesh: Mesh) -> dict:
  """This host's rows -> one global jax.Array per key, sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host_batch.items()}

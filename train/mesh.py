"""The device mesh, laid out like the rack: axes (data, fsdp, expert, tensor, context).

Devices are grouped into racks (fast domains): TPU slices, or one process's devices, or
`mesh.rack_size` consecutive devices when the config says so (simulated CPU). `mesh.across_racks`
sizes split the racks, `mesh.within_rack` sizes split the devices of one rack; an axis's size is
the product of its two parts, the across-rack part major.
"""
import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from omnimoe.train.config import ConfigError
from omnimoe.train.mesh_config import MeshConfig

AXES = ("data", "fsdp", "expert", "tensor", "context")
BATCH_AXES = ("data", "fsdp")


def _resolve(level: str, sizes: dict[str, int], total: int, what: str) -> dict[str, int]:
  """Fills the one -1 of a level so that its sizes multiply to `total`."""
  for name, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(f"config key 'mesh.{level}.{name}' must be positive or -1, got {size}")
  fills = [name for name, size in sizes.items() if size == -1]
  if len(fills) > 1:
    raise ConfigError(f"config keys 'mesh.{level}.{fills[0]}' and 'mesh.{level}.{fills[1]}' are "
                      f"both -1; at most one size per level may fill")
  known = math.prod(size for size in sizes.values() if size != -1)
  if fills and total % known == 0:
    return dict(sizes, **{fills[0]: total // known})
  if not fills and known == total:
    return dict(sizes)
  shown = " x ".join(f"{n}={s}" for n, s in sizes.items() if s != 1)
  raise ConfigError(f"config key 'mesh.{level}': sizes {shown or '1'} do not fit {total} {what}")


def _racks(devices: list, rack_size: int) -> list[list]:
  """Devices grouped into racks, each rack in device-id order."""
  devices = sorted(devices, key=lambda d: (getattr(d, "slice_index", 0) or 0, d.process_index, d.id))
  if rack_size:
    if rack_size > len(devices) or len(devices) % rack_size:
      raise ConfigError(f"config key 'mesh.rack_size'={rack_size} does not divide the "
                        f"{len(devices)} devices")
    return [devices[i:i + rack_size] for i in range(0, len(devices), rack_size)]
  key = (lambda d: d.slice_index) if devices[0].platform == "tpu" else (lambda d: d.process_index)
  groups: dict = {}
  for d in devices:
    groups.setdefault(key(d), []).append(d)
  return list(groups.values())


def make_mesh(cfg: MeshConfig | None = None, devices=None) -> Mesh:
  cfg = cfg or MeshConfig()
  devices = list(jax.devices() if devices is None else devices)
  racks = _racks(devices, cfg.rack_size)
  rack_size = len(racks[0])
  if cfg.within_rack.expert > rack_size:
    raise ConfigError(f"config key 'mesh.within_rack.expert'={cfg.within_rack.expert} would span "
                      f"racks: a rack holds {rack_size} devices (mesh.rack_size)")
  if cfg.within_rack.context > rack_size:
    raise ConfigError(f"config key 'mesh.within_rack.context'={cfg.within_rack.context} would span "
                      f"racks: a rack holds {rack_size} devices (mesh.rack_size)")
  across = _resolve("across_racks", vars(cfg.across_racks), len(racks), "racks")
  within = _resolve("within_rack", vars(cfg.within_rack), rack_size, "devices of a rack")
  across_shape = (across["data"], across["fsdp"], 1, 1, 1)
  within_shape = tuple(within[a] for a in AXES)
  if devices[0].platform == "cpu" or len(racks) == 1 and cfg.rack_size:
    grid = np.asarray(racks).reshape(across_shape[:2] + within_shape)
    grid = grid.transpose(0, 2, 1, 3, 4, 5, 6).reshape(
        tuple(a * w for a, w in zip(across_shape, within_shape)))
  elif len(racks) == 1:
    grid = mesh_utils.create_device_mesh(within_shape, devices=racks[0])
  else:
    grid = mesh_utils.create_hybrid_device_mesh(
        within_shape, across_shape, devices=[d for r in racks for d in r],
        process_is_granule=devices[0].platform != "tpu")
  return Mesh(grid, AXES)


def batch_sharding(mesh: Mesh, seq_len: int = 0) -> NamedSharding:
  """Rows of every batch array are split over the data-parallel axes, and their `seq_len`
  positions over `context` when it divides them (0: rows only)."""
  c = mesh.shape["context"]
  if c > 1 and seq_len and seq_len % c == 0:
    return NamedSharding(mesh, P(BATCH_AXES, "context"))
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch(mesh: Mesh, batch_size: int, key: str = "train.batch_size",
                microbatches: int = 1) -> None:
  replicas = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % replicas:
    raise ConfigError(f"config key '{key}'={batch_size} must be divisible by the {replicas} "
                      f"data-parallel replicas (mesh data x fsdp)")
  if (batch_size // microbatches) % replicas:
    raise ConfigError(f"config key 'train.microbatches'={microbatches} leaves "
                      f"{batch_size // microbatches} rows per microbatch, not divisible by the "
                      f"{replicas} data-parallel replicas (mesh data x fsdp)")


def global_batch(host_batch: dict, mesh: Mesh) -> dict:
  """This host's rows -> one global jax.Array per key, sharded over the batch axes (and the
  length over `context`, when it divides it)."""
  sharding = batch_sharding(mesh, host_batch["tokens"].shape[1])
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host_batch.items()}

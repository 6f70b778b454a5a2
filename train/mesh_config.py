"""The mesh section of a config: which parallelism runs across racks and which inside one.

A rack is a fast domain (NVLink island, TPU slice, or `rack_size` simulated CPU devices). Only data
and fsdp parallelism may cross racks; expert, tensor and context parallelism stay inside one.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class AcrossRacks:
  data: int = -1                  # data-parallel replicas over the slow links; -1 fills
  fsdp: int = 1                   # parameter sharding over the slow links (rarely worth it)


@dataclasses.dataclass(frozen=True)
class WithinRack:
  data: int = -1                  # data parallelism inside a rack; -1 fills
  fsdp: int = 1                   # parameters and optimizer state sharded (ZeRO-3 style)
  expert: int = 1                 # experts split over devices (expert parallelism)
  tensor: int = 1                 # matrices split over devices (Megatron style)
  context: int = 1                # sequence split over devices (reserved; must be 1 for now)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  across_racks: AcrossRacks = dataclasses.field(default_factory=AcrossRacks)
  within_rack: WithinRack = dataclasses.field(default_factory=WithinRack)
  rack_size: int = 0              # devices per rack where the platform does not say; 0 = all devices of one process

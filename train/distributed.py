"""Multi-host start-up through JAX's own multi-controller runtime (`jax.distributed`).

Every process runs the same command; each loads only its share of the data and all of them write
and read checkpoints together. Must run before anything touches a JAX backend.
"""
import os

import jax


def cluster_detected() -> bool:
  """True on a multi-process SLURM job or a multi-host TPU pod, where JAX finds its peers itself."""
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins the processes of one run: explicit arguments, or auto-detection on SLURM / TPU pods."""
  explicit = (coordinator_address, num_processes, process_id)
  if all(v is None for v in explicit):
    if cluster_detected():
      jax.distributed.initialize()
      check_preemption_service()
    return
  if any(v is None for v in explicit):
    raise ValueError("multi-host needs all of --coordinator-address, --num-processes and --process-id")
  # CPU devices of different processes talk through gloo; accelerators are unaffected.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  check_preemption_service()


def check_preemption_service() -> None:
  """Raises ValueError (one line) when several processes run without jax's preemption service:
  a SIGTERM to one host could then not stop every host at the same step (train/preemption.py)."""
  from omnimoe.train.preemption import sync_manager_running
  if jax.process_count() > 1 and not sync_manager_running():
    raise ValueError("a multi-host run needs jax's preemption service to stop every host at the "
                     "same step on SIGTERM: leave jax_enable_preemption_service on (the default)")

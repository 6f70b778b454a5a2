"""Which hardware paths have passed `bench/accelerator_check.py`, per platform, device kind and jax
version: `auto` picks a hardware path (tokamax, megablox or ragged_dot grouped matmuls, cuDNN
attention, ragged_all_to_all dispatch) only where it has passed; elsewhere it picks the path the
CPU tests cover (the blocked grouped matmul, XLA or blockwise attention, all_gather dispatch).

The record is `model/hardware_paths.json`, shipped with the package: a list of
`{"path", "platform", "device_kind", "jax", "date", "max_error", ...}` entries that
`python -m bench.accelerator_check --record` appends on the machine where they passed. An entry
counts for exactly its device kind and jax version (a new jax release runs the check again).
`OMNIMOE_HARDWARE_PATHS` names another record (tests; a cluster's own).
"""
import functools
import json
import os
import pathlib

import jax

RECORD = pathlib.Path(__file__).with_name("hardware_paths.json")
PATHS = ("tokamax", "megablox", "ragged_dot", "cudnn", "ragged_all_to_all")   # what the record gates


def record_file() -> pathlib.Path:
  return pathlib.Path(os.environ.get("OMNIMOE_HARDWARE_PATHS") or RECORD)


@functools.cache
def _entries(path: str) -> tuple:
  file = pathlib.Path(path)
  if not file.is_file():
    return ()
  try:
    return tuple(json.loads(file.read_text()).get("passed", ()))
  except (OSError, ValueError, AttributeError):
    raise ValueError(f"{file} is not a hardware-path record (JSON with a 'passed' list)") from None


def here() -> dict:
  """This process's platform, device kind and jax version."""
  return {"platform": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
          "jax": jax.__version__}


def has_passed(path: str) -> bool:
  """Whether `path` passed the accelerator check on this platform, device kind and jax version."""
  now = here()
  return any(e.get("path") == path and all(e.get(k) == v for k, v in now.items())
             for e in _entries(str(record_file())))


def add(results: list[dict], file: pathlib.Path | None = None) -> list[dict]:
  """Appends the passed `results` (rows of the check, with `path`, `platform`, `device_kind`,
  `jax`) to the record, replacing an earlier entry of the same path and machine; -> the added."""
  file = pathlib.Path(file or record_file())
  old = list(_entries(str(file)))
  key = lambda e: (e.get("path"), e.get("platform"), e.get("device_kind"), e.get("jax"))
  new = [r for r in results if r.get("passed") and r.get("path") in PATHS]
  kept = [e for e in old if key(e) not in {key(r) for r in new}]
  file.write_text(json.dumps({"passed": kept + new}, indent=1) + "\n")
  _entries.cache_clear()
  return new

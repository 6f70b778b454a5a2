"""Hidden work folders beside an output folder, so that a folder is never half-written.

A writer works in `.OUT.partial-PID` beside OUT and renames it to OUT when complete (moving a
previous OUT to `.OUT.old-PID` while it swaps). A writer killed outright leaves its folder behind:
`remove_stale` removes those whose process is no longer running on this machine.
"""
import glob
import os
import pathlib
import shutil


def name(out: pathlib.Path, kind: str, pid: int) -> pathlib.Path:
  """The hidden folder beside `out` a prepare with process id `pid` works in (`partial`) or moves
  the previous version to while swapping (`old`)."""
  return out.absolute().parent / f".{out.name}.{kind}-{pid}"


def pid_running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OverflowError, OSError):
    return True   # someone else's process (or unknowable): leave its folder alone
  return True


def remove_stale(out: pathlib.Path) -> list[pathlib.Path]:
  """Removes `.OUT.partial-PID[-ANY]` / `.OUT.old-PID[-ANY]` folders beside `out` left by
  processes that were killed before they could clean up (PID no longer running;
  data/builtin/cache.py adds a thread id); returns what it removed."""
  out = pathlib.Path(out).absolute()
  removed = []
  if not out.parent.is_dir():
    return removed
  for kind in ("partial", "old"):
    prefix = f".{out.name}.{kind}-"
    for path in out.parent.glob(glob.escape(prefix) + "*"):
      pid = path.name[len(prefix):].split("-")[0]
      if (pid.isdigit() and int(pid) != os.getpid() and path.is_dir() and not path.is_symlink()
          and not pid_running(int(pid))):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
  return removed

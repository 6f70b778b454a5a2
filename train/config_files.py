"""Where a config named on the command line is found: a YAML file, or a config shipped with omnimoe.

  omnimoe train configs/tiny.yaml   # a file, relative to the current directory
  omnimoe train tiny                # the shipped configs/tiny.yaml (installed with the package)
  omnimoe train configs/tiny.yaml   # from any folder: no such file there -> the shipped copy

The shipped configs are the repository's `configs/*.yaml`, installed as the package
`omnimoe.configs`, so a regular install (`pip install .`, a wheel, Colab) can name them without the
repository. A file that exists always wins over a shipped config of the same name.
"""
import importlib.resources
import pathlib

SUFFIX = ".yaml"


def shipped() -> dict[str, pathlib.Path]:
  """Name (file stem) -> path of every config shipped with the package."""
  root = importlib.resources.files("omnimoe.configs")
  return {p.name[:-len(SUFFIX)]: pathlib.Path(str(p)) for p in root.iterdir()
          if p.name.endswith(SUFFIX)}


def find(path: str | pathlib.Path) -> pathlib.Path | None:
  """The file `path` names: itself when it exists; else the shipped config it names (`tiny`,
  `tiny.yaml` or `configs/tiny.yaml`); else None."""
  given = pathlib.Path(path)
  if given.is_file():
    return given
  if given.parent not in (pathlib.Path("."), pathlib.Path("configs")):
    return None
  name = given.name[:-len(SUFFIX)] if given.name.endswith(SUFFIX) else given.name
  return shipped().get(name)

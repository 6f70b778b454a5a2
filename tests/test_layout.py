"""The house rules of the code: one import name, rooms that import downward only, small files."""
import ast
import importlib
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("model", "data", "train")
SOURCES = sorted(p for folder in (*PACKAGES, "bench", "tests", "configs")
                 for p in (ROOT / folder).rglob("*.py"))
MAX_LINES = 400


def imported_modules(path: pathlib.Path) -> list[str]:
  """Every module a file imports (absolute names), functions' imports included."""
  out = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
  return out


def test_code_imports_the_one_installed_name_only():
  """`omnimoe.model` / `omnimoe.data` / `omnimoe.train`, never the bare folder names (which would
  load every module twice and collide with a user's own `data` or `train`)."""
  bad = [(p.relative_to(ROOT), m) for p in SOURCES for m in imported_modules(p)
         if m.split(".")[0] in (*PACKAGES, "configs")]
  assert not bad, bad


def test_no_python_file_is_over_400_lines():
  long = {str(p.relative_to(ROOT)): n for p in SOURCES
          if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert not long, long


# Which rooms a room may import (besides itself and the shared files at data/'s top level).
ALLOWED = {
    "omnimoe.model": {"omnimoe.model"},
    "omnimoe.data.prepare": {"omnimoe.data.prepare", "omnimoe.data.shared", "omnimoe.model.modality"},
    "omnimoe.data.builtin": {"omnimoe.data.builtin", "omnimoe.data.prepare", "omnimoe.data.shared",
                             "omnimoe.model.modality"},
    "omnimoe.data.pipeline": {"omnimoe.data.pipeline", "omnimoe.data.builtin",
                              "omnimoe.data.prepare", "omnimoe.data.shared",
                              "omnimoe.model.modality"},
    "omnimoe.data.shared": {"omnimoe.data.shared", "omnimoe.data.prepare",
                            "omnimoe.model.modality"},
}


def room(module: str) -> str:
  """The room of an omnimoe module name: a data subpackage, data's shared files, model, train."""
  parts = module.split(".")
  if parts[:2] == ["omnimoe", "data"]:
    if len(parts) > 2 and parts[2] in ("builtin", "prepare", "pipeline"):
      return ".".join(parts[:3])
    return "omnimoe.data.shared"
  return ".".join(parts[:2])


def test_rooms_import_downward_only():
  """model/ imports nothing of data/ or train/; data/ reads only the modality table of model/;
  prepare/ knows nothing of the default dataset or the pipeline; builtin/ nothing of the pipeline.
  (data/__init__.py is the public face of data/ and may import any of its rooms.)"""
  bad = []
  for path in sorted((ROOT / "model").rglob("*.py")) + sorted((ROOT / "data").rglob("*.py")):
    rel = path.relative_to(ROOT).with_suffix("")
    if rel.as_posix() == "data/__init__":
      continue
    mine = room("omnimoe." + ".".join(rel.parts))
    for m in imported_modules(path):
      if m.startswith("omnimoe.") and m.count(".") >= 1:
        theirs = room(m)
        shared_ok = (m == "omnimoe.data" and mine.startswith("omnimoe.data")) or \
            room(m) in ALLOWED[mine] or \
            (theirs == "omnimoe.model" and m.startswith("omnimoe.model.modality")
             and "omnimoe.model.modality" in ALLOWED[mine])
        if not shared_ok:
          bad.append((str(rel), m))
  assert not bad, bad


@pytest.mark.parametrize("package", ["omnimoe.data.builtin", "omnimoe.data.prepare",
                                     "omnimoe.data.pipeline", "omnimoe.configs"])
def test_each_room_says_what_it_holds(package):
  doc = importlib.import_module(package).__doc__ or ""
  assert len(doc.split()) >= 20, f"{package}/__init__.py needs a paragraph saying what it holds"


def test_importing_everything_loads_each_module_once():
  """Every module under omnimoe imports, and none is also loaded under a bare name."""
  names = sorted("omnimoe." + ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(
      ".__init__") for folder in (*PACKAGES, "configs") for p in (ROOT / folder).rglob("*.py"))
  code = ("import importlib, sys\n"
          f"for name in {names!r}:\n"
          "  importlib.import_module(name)\n"
          "bare = sorted(k for k in sys.modules if k.split('.')[0] in "
          "('model', 'data', 'train', 'configs'))\n"
          "assert not bare, bare\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert len(names) >= 50


def test_every_shipped_config_is_packaged():
  from omnimoe.train import config_files
  on_disk = {p.stem for p in (ROOT / "configs").glob("*.yaml")}
  assert on_disk and set(config_files.shipped()) == on_disk

"""notebooks/colab_tpu.ipynb runs top to bottom from a regular install, as a Colab user gets it.

A wheel of this checkout goes into a FRESH venv (no system site packages: the checkout is installed
editable system-wide and would leak in) through the notebook's own install cell (OMNIMOE_PIP_SPEC
points it at the wheel; the dependencies come from the package index, pip's cache makes reruns
fast). The code cells then run in order, as one script, with the venv's python, from a folder
outside the checkout, on 8 simulated CPU devices.
"""
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "colab_tpu.ipynb"
# Never part of the wheel: the checkout's own build output (build/ can hold stale modules), caches.
NOT_SOURCE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "runs",
                                    ".pytest_cache", ".benchmarks")
GENERIC = ("model", "data", "train", "configs")   # must never be installed as top-level packages
CELL_MARK = "## notebook cell"
# Appended after the notebook's cells: which omnimoe the notebook's process imported.
PROBE = """
import json, omnimoe, omnimoe.train, sys
print("PROBE", json.dumps({"omnimoe": list(omnimoe.__path__), "train": omnimoe.train.__file__,
                           "generic": sorted(set(sys.modules) & %r)}))
""" % set(GENERIC)


def _run(cmd: list, *, timeout: float, **kw) -> subprocess.CompletedProcess:
  out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
  assert out.returncode == 0, (f"{cmd[:4]} exited {out.returncode}:\n"
                               f"{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
  return out


def build_wheel(out: pathlib.Path) -> pathlib.Path:
  """A wheel of the working tree, built from a copy of it (nothing is written into the checkout)."""
  src = out / "src"
  shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
  _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, src], timeout=300)
  (wheel,) = out.glob("omnimoe-*.whl")
  return wheel


def notebook_script() -> str:
  """The notebook's code cells in order, each announced on stdout (a failure names its cell)."""
  nb = json.loads(NOTEBOOK.read_text())
  cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
  return "\n\n".join(f'print("{CELL_MARK} {i}", flush=True)\n{src}'
                     for i, src in enumerate(cells, 1))


def _clean_env(venv: pathlib.Path, **extra: str) -> dict:
  """The environment of a user who activated the venv: nothing points back at the checkout."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "XLA_FLAGS")}
  env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
             PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", JAX_PLATFORMS="cpu",
             # pip's --no-compile: no .pyc for every installed module (~7k files, about a minute
             # here); Python compiles what the notebook imports. (PIP_NO_COMPILE=1 does not do it.)
             PIP_COMPILE="0", **extra)
  return env


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory):
  """Runs the notebook once in a fresh venv; yields (venv, site-packages, run folder, stdout).
  The venv (about a GB) is removed afterwards."""
  wheel = build_wheel(tmp_path_factory.mktemp("wheel"))
  venv = tmp_path_factory.mktemp("venv")
  _run([sys.executable, "-m", "venv", venv], timeout=300)
  python = venv / "bin" / "python"
  env = _clean_env(venv)
  purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
  site = pathlib.Path(_run([python, "-c", purelib], timeout=60, env=env).stdout.strip())
  assert not (site / "omnimoe").exists(), "the fresh venv already holds omnimoe"
  folder = tmp_path_factory.mktemp("colab")   # the notebook's working folder, not the checkout
  (folder / "notebook.py").write_text(notebook_script() + "\n" + PROBE)
  env = _clean_env(venv, OMNIMOE_PIP_SPEC=str(wheel), OMNIMOE_WORKDIR=str(folder / "run"),
                   OMNIMOE_CACHE=str(folder / "cache"))
  out = subprocess.run([python, "notebook.py"], cwd=folder, env=env, capture_output=True, text=True,
                       timeout=900)
  cell = [l for l in out.stdout.splitlines() if l.startswith(CELL_MARK)][-1:]
  assert out.returncode == 0, f"{cell} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
  yield venv, site, folder / "run", out.stdout
  shutil.rmtree(venv, ignore_errors=True)


@pytest.mark.slow
def test_notebook_trains_and_reports_on_8_cpu_devices(notebook_run):
  _, _, run, stdout = notebook_run
  assert "8 devices: cpu" in stdout
  assert "data: 2" in stdout and "expert: 4" in stdout              # the mesh cell
  assert "finished 4 steps" in stdout and (run / "checkpoints" / "4").is_dir()
  losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]
  assert losses and all(math.isfinite(x) for x in losses)
  printed = next(l for l in stdout.splitlines() if l.startswith("first / last loss:"))
  first, last = printed.split()[-2:]
  assert (float(first), float(last)) == (losses[0], losses[-1])
  for name in ("expert_load.png", "loss.png"):                     # the report cell's pictures
    assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert str(run / name) in next(l for l in stdout.splitlines() if l.startswith("report:"))


@pytest.mark.slow
def test_notebook_imports_the_installed_wheel_not_the_checkout(notebook_run):
  _, site, _, stdout = notebook_run
  probe = json.loads(next(l for l in stdout.splitlines() if l.startswith("PROBE "))[len("PROBE "):])
  assert probe["omnimoe"] == [str(site / "omnimoe")]
  assert pathlib.Path(probe["train"]) == site / "omnimoe" / "train" / "__init__.py"
  assert not pathlib.Path(probe["train"]).is_relative_to(ROOT)
  assert probe["generic"] == []                       # no `import train` / `import data` anywhere
  assert (site / "omnimoe" / "configs" / "colab_tpu.yaml").is_file()
  installed = {p.name.removesuffix(".py") for p in site.iterdir()}
  assert installed.isdisjoint(GENERIC), sorted(installed & set(GENERIC))
  assert not list(site.glob("__editable__*omnimoe*")) and not list(site.glob("*omnimoe*.pth"))


@pytest.mark.slow
def test_installed_cli_names_a_shipped_config_from_any_folder(notebook_run, tmp_path):
  venv, _, _, _ = notebook_run
  out = _run([venv / "bin" / "omnimoe", "config", "tiny"], timeout=120, cwd=tmp_path,
             env=_clean_env(venv))
  printed = yaml.safe_load(out.stdout)
  shipped = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
  for section, values in shipped.items():                 # every value the checkout's file sets
    assert _subset(values, printed[section]), section


def _subset(want, got) -> bool:
  if isinstance(want, dict):
    return isinstance(got, dict) and all(k in got and _subset(v, got[k]) for k, v in want.items())
  return want == got


def test_install_cell_stops_on_the_placeholder_url(tmp_path):
  """Without OMNIMOE_PIP set (still the placeholder) and no OMNIMOE_PIP_SPEC, the first cell stops
  with one line saying what to set, before pip runs."""
  nb = json.loads(NOTEBOOK.read_text())
  install = "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])
  assert 'OMNIMOE_PIP = "git+https://github.com/<your-org>/omnimoe"' in install
  (tmp_path / "cell.py").write_text(install)
  for override in (None, ""):
    env = {k: v for k, v in os.environ.items() if k != "OMNIMOE_PIP_SPEC"}
    if override is not None:
      env["OMNIMOE_PIP_SPEC"] = override
    out = subprocess.run([sys.executable, "cell.py"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "Set OMNIMOE_PIP" in out.stderr, out.stderr

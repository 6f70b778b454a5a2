"""notebooks/colab_tpu.ipynb runs top to bottom on CPU (8 simulated devices), as on a TPU runtime."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent


@pytest.mark.slow
def test_colab_notebook_runs_top_to_bottom_on_cpu(tmp_path):
  nb = json.loads((ROOT / "notebooks/colab_tpu.ipynb").read_text())
  cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
  script = tmp_path / "notebook.py"
  script.write_text("\n\n".join(cells))
  env = dict(os.environ, OMNIMOE_WORKDIR=str(tmp_path / "run"), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "8 devices" in out.stdout and "finished 4 steps" in out.stdout
  assert "expert: 4" in out.stdout
  assert (tmp_path / "run" / "checkpoints" / "4").is_dir()

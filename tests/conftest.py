"""Every test runs on 8 simulated CPU devices, so every sharding path runs in CI.

The default dataset's prepared folders (data/default_prepared.py) are built into a cache folder of
this test session (OMNIMOE_CACHE; set it yourself to reuse one across sessions), never into the
user's ~/.cache/omnimoe."""
import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "OMNIMOE_CACHE" not in os.environ:
  os.environ["OMNIMOE_CACHE"] = tempfile.mkdtemp(prefix="omnimoe-test-cache-")
  atexit.register(shutil.rmtree, os.environ["OMNIMOE_CACHE"], True)

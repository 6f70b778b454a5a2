"""Every test runs on 8 simulated CPU devices, so every sharding path runs in CI.

The default dataset's prepared folders (data/default_prepared.py) are built into a cache folder of
this test session (OMNIMOE_CACHE; set it yourself to reuse one across sessions), never into the
user's ~/.cache/omnimoe.

Compiled programs go to a persistent compilation cache of this test session (OMNIMOE_TEST_JAX_CACHE),
so a program that several tests build alike (the same init or train step of the same tiny model,
in another test or another xdist worker) compiles once: the others load XLA's executable of it.
It is set in the test processes only; a test that starts a process passes it on itself
(`jax_cache_env`) where that process repeats programs, so the processes a multi-host test starts
compile as a user's do."""
import atexit
import os
import shutil
import tempfile

# The tests' programs are tiny, so compiling them costs more than running them: LLVM's cheap
# passes only (XLA's own graph passes all run; a reduction may round differently in its last bit,
# never by more than the tests' tolerances). Processes a test starts inherit this.
FAST_COMPILE = " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + FAST_COMPILE
                           + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "OMNIMOE_CACHE" not in os.environ:
  os.environ["OMNIMOE_CACHE"] = tempfile.mkdtemp(prefix="omnimoe-test-cache-")
  atexit.register(shutil.rmtree, os.environ["OMNIMOE_CACHE"], True)
if "OMNIMOE_TEST_JAX_CACHE" not in os.environ:
  os.environ["OMNIMOE_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="omnimoe-test-jax-cache-")
  atexit.register(shutil.rmtree, os.environ["OMNIMOE_TEST_JAX_CACHE"], True)

# Programs that compile faster than this are not worth a file (most are a few ms).
MIN_COMPILE_SECS = 0.2


def jax_cache_env() -> dict:
  """Environment variables that give a child process this session's compilation cache."""
  return {"JAX_COMPILATION_CACHE_DIR": os.environ["OMNIMOE_TEST_JAX_CACHE"],
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(MIN_COMPILE_SECS)}


import jax  # noqa: E402  (after XLA_FLAGS: the backend reads them when it starts)

jax.config.update("jax_compilation_cache_dir", os.environ["OMNIMOE_TEST_JAX_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)

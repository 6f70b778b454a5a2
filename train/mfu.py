"""Model FLOPs utilisation of training, for the metrics of every logged step.

  real_tokens_per_s   non-padding tokens (segment id > 0) per second, over the logged window
  tflops_per_device   model FLOPs per token x real_tokens_per_s / devices, in TFLOP/s
  mfu                 tflops_per_device / the device's peak (absent when the peak is unknown)

Model FLOPs per token are train/plan.py's count (6 x the matmul parameters a token uses, embedding
excluded, + causal attention; forward and backward), so padding and recomputation (remat) count
for nothing: this is the useful work done, as PaLM's MFU defines it.

Peaks, dense bfloat16 matmul per chip, from the vendors' datasheets (`PEAK_TFLOPS`; matched by
substring of `device_kind`). A float32 run on an accelerator is measured against the same bf16
peak. A CPU has no datasheet figure here: `measured_cpu_peak_tflops` times a float32 matmul on one
device (which uses the whole host's threads) and divides it among the devices that share the host
(the simulated devices of the tests, or a host's CPU devices)."""
import time

import jax
import jax.numpy as jnp

# device_kind substring -> dense bf16 TFLOP/s per chip (NVIDIA and Google Cloud datasheets); the
# longest matching key wins, so the PCIe H100 (a lower clock) is not read as the SXM part
PEAK_TFLOPS = {"B200": 2250.0, "H200": 989.0, "H100": 989.0, "H100 PCIe": 756.0, "H800": 989.0,
               "A100": 312.0, "TPU v6": 918.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0,
               "TPU v5e": 197.0, "TPU v4": 275.0}


def datasheet_peak_tflops(device_kind: str) -> float | None:
  """The table's peak for this device kind (the longest matching key), or None."""
  hits = [k for k in PEAK_TFLOPS if k.lower() in device_kind.lower()]
  return PEAK_TFLOPS[max(hits, key=len)] if hits else None


def measured_cpu_peak_tflops(n: int = 1024, repeats: int = 5) -> float:
  """float32 matmul TFLOP/s of one CPU device (best of `repeats`) / local devices."""
  device = jax.local_devices()[0]
  x = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best / 1e12 / jax.local_device_count()


def peak_tflops() -> tuple[float | None, str]:
  """(per-device peak TFLOP/s or None, where it comes from) for this process's devices."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    return measured_cpu_peak_tflops(), "measured float32 matmul, host shared by its CPU devices"
  peak = datasheet_peak_tflops(device.device_kind)
  if peak is None:
    return None, f"no peak known for '{device.device_kind}': mfu is not logged"
  return peak, f"datasheet dense bf16 peak of {device.device_kind}"


def utilisation(real_tokens: float, seconds: float, flops_per_token: float, devices: int,
                peak: float | None) -> dict:
  """The metrics of the module docstring for a window of `seconds` that trained `real_tokens`."""
  rate = real_tokens / max(seconds, 1e-9)
  out = {"real_tokens_per_s": rate, "tflops_per_device": flops_per_token * rate / devices / 1e12}
  if peak:
    out["mfu"] = out["tflops_per_device"] / peak
  return out

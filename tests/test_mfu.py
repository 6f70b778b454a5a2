"""MFU in the metrics (train/mfu.py): the datasheet peaks are found by device kind, the metrics are
the model FLOPs of the real tokens over the window's time, per device, over the peak; a CPU's
peak is measured and shared by the devices on the host."""
import jax
import pytest

from omnimoe.train import mfu


@pytest.mark.parametrize("kind,peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0),
                                       ("NVIDIA A100-SXM4-80GB", 312.0), ("TPU v5 lite", 197.0),
                                       ("TPU v6 lite", 918.0), ("TPU v4", 275.0),
                                       ("NVIDIA H100 PCIe", 756.0), ("NVIDIA L40S", None),
                                       ("Some New Chip", None)])
def test_datasheet_peaks_by_device_kind(kind, peak):
  assert mfu.datasheet_peak_tflops(kind) == peak


def test_utilisation_is_model_flops_of_real_tokens_per_device_over_the_peak():
  # 3,000 real tokens in 2 s at 6 GFLOP per token on 8 devices: 1.125 TFLOP/s per device.
  got = mfu.utilisation(3000, 2.0, 6e9, 8, peak=4.5)
  assert got == pytest.approx({"real_tokens_per_s": 1500.0, "tflops_per_device": 1.125,
                               "mfu": 0.25})
  assert "mfu" not in mfu.utilisation(3000, 2.0, 6e9, 8, peak=None)


def test_a_cpu_peak_is_measured_and_shared_by_the_hosts_devices():
  per_device = mfu.measured_cpu_peak_tflops(n=256, repeats=3)
  host = per_device * jax.local_device_count()
  assert jax.local_device_count() == 8
  assert 1e-4 < host < 20          # TFLOP/s of a CPU host: a unit slip shows
  peak, source = mfu.peak_tflops()
  assert peak > 0 and "measured" in source

"""Datasheet peaks of the GPUs the check knows: `GpuPeak`, the `GPU_PEAKS` table and `lookup_gpu_peak`, against
which the throughput part reports model FLOPs utilisation. Plain data: imports nothing of torch or of this package.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuPeak:
    """A GPU's datasheet rates in TFLOP/s, dense (without structured sparsity). `fp32` is the CUDA cores' rate
    (no TF32); `bf16` and `tf32` are tensor-core rates; `bf16` is None where the GPU has no bf16 tensor cores."""

    part: str
    bf16: float | None
    fp32: float
    tf32: float | None = None
    note: str | None = None


# Matched against `torch.cuda.get_device_name()` in order: the first entry whose words all occur in the name.
# The vendor's datasheets list tensor rates "with sparsity"; the dense rates here are half of those.
GPU_PEAKS: tuple[tuple[tuple[str, ...], GpuPeak], ...] = (
    (("GH200",), GpuPeak("GH200", bf16=989.4, fp32=66.9, tf32=494.7)),
    (("H200", "NVL"), GpuPeak("H200 NVL", bf16=835.5, fp32=60.0, tf32=417.5)),
    (("H200",), GpuPeak("H200 SXM", bf16=989.4, fp32=66.9, tf32=494.7)),
    (("H100", "PCIe"), GpuPeak("H100 PCIe", bf16=756.5, fp32=51.2, tf32=378.0)),
    (("H100", "NVL"), GpuPeak("H100 NVL", bf16=835.5, fp32=60.0, tf32=417.5)),
    (("H100",), GpuPeak("H100 SXM", bf16=989.4, fp32=66.9, tf32=494.7)),
    (("A100",), GpuPeak("A100 (40 or 80 GB, SXM or PCIe)", bf16=312.0, fp32=19.5, tf32=156.0)),
    (("L40S",), GpuPeak("L40S", bf16=362.05, fp32=91.6, tf32=183.0)),
    (("L40",), GpuPeak("L40", bf16=181.05, fp32=90.5, tf32=90.5)),
    (("L4",), GpuPeak("L4", bf16=121.0, fp32=30.3, tf32=60.0)),
    (
        ("A10G",),
        GpuPeak(
            "A10G",
            bf16=70.0,
            fp32=31.2,
            tf32=35.0,
            note="no vendor datasheet exists for the A10G; these are the commonly reported rates, so read the "
            "measured GEMM rate as its limit",
        ),
    ),
    (("A10",), GpuPeak("A10", bf16=125.0, fp32=31.2, tf32=62.5)),
    (("V100",), GpuPeak("V100", bf16=None, fp32=15.7, note="no bf16 tensor cores (fp16 only)")),
    (("T4",), GpuPeak("T4", bf16=None, fp32=8.1, note="no bf16 tensor cores (fp16 only)")),
)


def lookup_gpu_peak(device_name: str) -> GpuPeak | None:
    """The datasheet peak of a GPU named like `torch.cuda.get_device_name()`, or None for a part not listed."""
    words = device_name.replace("-", " ").split()
    for required, peak in GPU_PEAKS:
        # whole words, so that "L4" does not match "L40S" ("A100-SXM4-80GB" was split on "-" above)
        if all(word in words for word in required):
            return peak
    return None


__all__ = ["GPU_PEAKS", "GpuPeak", "lookup_gpu_peak"]

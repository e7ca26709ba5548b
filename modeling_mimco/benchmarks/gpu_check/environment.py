"""The GPU check's `environment` part: versions, the device, its datasheet peaks and its measured large-GEMM rates
in bf16, fp32 and (on CUDA) TF32. It leaves the peak and the rates in the run's context for the throughput part.
Imports torch, transformers, torchvision and the package's `benchmarking`.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import asdict

import torch
import transformers

from modeling_mimco import __version__
from modeling_mimco.benchmarks.gpu_check.arguments import GpuCheckArguments
from modeling_mimco.benchmarks.gpu_check.checks import Budget, Checks
from modeling_mimco.benchmarks.gpu_check.peaks import GpuPeak, lookup_gpu_peak
from modeling_mimco.benchmarks.measurement import cpu_supports_bf16, measure_gemm_rate


def check_environment(args: GpuCheckArguments, context: dict, budget: Budget) -> dict:
    """Versions, the device, its datasheet peaks and its measured large-GEMM rates."""
    result = software_versions(args)
    facts, peak = device_facts(args.device)
    result.update(facts)
    context["peak"] = peak
    checks, rates = measure_gemms(args, peak, budget)
    result["gemm"] = {item["name"][5:]: item for item in checks.items}
    context["gemm_rate"] = rates
    result["checks"] = checks.items
    return result


def software_versions(args: GpuCheckArguments) -> dict:
    """Python, torch, CUDA, cuDNN, transformers, torchvision and this package's versions, and the CPU."""
    import torchvision

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformers": transformers.__version__,
        "torchvision": torchvision.__version__,
        "mimco": __version__,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
    }


def device_facts(device: str) -> tuple[dict, GpuPeak | None]:
    """The GPU's name, memory and bf16 support and its datasheet peak (None on a CPU or for an unlisted GPU)."""
    if device != "cuda":
        return {
            "bf16_supported": cpu_supports_bf16(),
            "datasheet_peak_tflops": None,
            "datasheet_peak_reason": "skipped: no CUDA (datasheet peaks are listed for GPUs only)",
        }, None
    properties = torch.cuda.get_device_properties(0)
    facts = {
        "gpu_name": properties.name,
        "gpu_memory_gib": round(properties.total_memory / 2**30, 2),
        "compute_capability": f"{properties.major}.{properties.minor}",
        "multiprocessors": properties.multi_processor_count,
        "bf16_supported": torch.cuda.is_bf16_supported(),
        "gpu_count": torch.cuda.device_count(),
    }
    peak = lookup_gpu_peak(properties.name)
    facts["datasheet_peak_tflops"] = asdict(peak) if peak is not None else None
    if peak is None:
        facts["datasheet_peak_reason"] = f"{properties.name!r} is not in the table of known GPUs"
    return facts, peak


def measure_gemms(args: GpuCheckArguments, peak: GpuPeak | None, budget: Budget) -> tuple[Checks, dict]:
    """One check per precision (`gemm_bf16`, `gemm_fp32`, on CUDA `gemm_tf32`): the large-GEMM rate, also as a
    fraction of the datasheet peak; and the median rates in FLOP/s by precision."""
    checks = Checks()
    rates: dict[str, float] = {}
    precisions = [("bf16", torch.bfloat16, False), ("fp32", torch.float32, False)]
    if args.device == "cuda":
        precisions.append(("tf32", torch.float32, True))
    for name, dtype, tf32 in precisions:

        def measure(name=name, dtype=dtype, tf32=tf32) -> dict:
            seconds = min(1.0, budget.remaining() / (2 * len(precisions)))
            measured = measure_gemm_rate(args.device, dtype, args.gemm_size, min_seconds=seconds, allow_tf32=tf32)
            rates[name] = measured["median_flops_per_second"]
            entry = {
                "passed": math.isfinite(rates[name]) and rates[name] > 0,
                "size": measured["size"],
                "calls": measured["calls"],
                "tflops_median": measured["median_flops_per_second"] / 1e12,
                "tflops_best": measured["best_flops_per_second"] / 1e12,
            }
            datasheet = getattr(peak, name, None) if peak is not None else None
            if datasheet:
                entry["fraction_of_datasheet"] = entry["tflops_median"] / datasheet
            return entry

        checks.run(f"gemm_{name}", measure, budget)
    return checks, rates


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


__all__ = ["check_environment"]

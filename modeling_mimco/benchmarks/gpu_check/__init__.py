"""The GPU check kit: everything worth knowing about this package on one CUDA GPU, in one run of at most 8 minutes.

    python scripts/gpu_check.py                       # on a GPU machine: outputs/gpu_check/report.{json,md}
    python scripts/gpu_check.py --smoke               # every part on the CPU at tiny sizes, about 2 minutes

Parts, each stopped by its own time budget (`--budget_<part>` seconds) and by the run's `--max_minutes`:

- `environment`: GPU name, memory, torch/CUDA versions, bf16 support, the GPU's datasheet peaks (dense bf16, fp32
  without TF32; `modeling_mimco.benchmarks.gpu_check.peaks.GPU_PEAKS`) and the measured large-GEMM rate in bf16, fp32 and TF32.
- `correctness`: fp32 forward and gradients on the device equal the CPU's for `MimCoModel`, `MimCoForPreTraining`,
  `MimCoForImageClassification` and `MimCoForContrastivePreTraining`; bf16 autocast gives finite losses close to
  fp32; the fused-AdamW NaN/Inf skip (`optimization.build_adamw` + `optimization.skip_update_if`) leaves the
  weights and the step count untouched; `torch.compile` runs and agrees with eager; SDPA runs with only its fused
  (flash / memory-efficient) kernels allowed in bf16; `save_pretrained` -> `from_pretrained` is exact on the device.
- `throughput`: stage-2 and stage-1 training steps (ViT-S/16, 224 px, batch 128, bf16), eager and compiled, beside
  the stock-transformers reference step of `scripts/benchmark.py`: images/s, model FLOPs utilisation against the
  datasheet peak and against the measured GEMM rate, peak memory; gradient checkpointing's memory and speed; the
  largest batch that fits, found by doubling.
- `data`: the real stage-2 loader (`build_pretraining_transform`, `PretrainingExampleTransform`,
  `MimCoPretrainingCollator` and the training loop's seeded batches in a DataLoader with one worker per core) on
  generated 500x375 JPEGs, against the step's images/s; and GPU JPEG decoding (`torchvision.io.decode_jpeg(...,
  device="cuda")`), an opt-in path that the training scripts do not use.
- `reproduce`: `make reproduce`'s design (3 seeds sharing one teacher; raw pixels, random init, teacher, pixel MIM,
  pixel MIM at MimCo's compute and MimCo; probe, kNN and fine-tune; MimCo against each row beside the seed spread),
  sized by the reproduction's step planner to the part's budget, on CIFAR-10 (`../shared/datasets/cifar10` beside
  the repository root, or `--dataset_dir`); skipped when the data is absent. `--smoke` runs the same flags at the
  reproduction's smoke sizes with 2 seeds.

With `--smoke` (or `--device cpu`) the parts run on the CPU: the device-vs-CPU comparisons then compare the CPU
with itself (they exercise the code, nothing more), and what needs CUDA (datasheet peaks, per-step peak memory) says
"skipped: no CUDA". Without CUDA and without either flag the kit refuses to start. The report records for every part
`status` ("ok", "failed" or "skipped"), a `reason` for a skip, its seconds and its budget, and each part's checks.

| module         | what it holds                                                           |
|----------------|-------------------------------------------------------------------------|
| `arguments`    | `GpuCheckArguments`, `PARTS`, the default sizes and budgets             |
| `checks`       | a part's `Budget` and `Checks`, `PartSkipped`, shared numerical helpers |
| `peaks`        | the datasheet peaks of known GPUs (`GPU_PEAKS`, `lookup_gpu_peak`)      |
| `environment`  | the `environment` part                                                  |
| `correctness`  | the `correctness` part                                                  |
| `throughput`   | the `throughput` part                                                   |
| `loader`       | the `data` part                                                         |
| `reproduction` | the `reproduce` part                                                    |
| `report`       | `report.json` and `report.md`                                           |
| `runner`       | the run (`run_part`, `run_check`) and the command line (`main`, `cli`)  |

The package imports only torch, transformers, torchvision, datasets and this package, and nothing imports it: the
model files never load it.
"""

from modeling_mimco.benchmarks.gpu_check.arguments import PARTS, GpuCheckArguments
from modeling_mimco.benchmarks.gpu_check.report import write_report
from modeling_mimco.benchmarks.gpu_check.runner import PART_FUNCTIONS, cli, main, run_check, run_part


__all__ = ["PARTS", "PART_FUNCTIONS", "GpuCheckArguments", "cli", "main", "run_check", "run_part", "write_report"]

"""The GPU check's report: `write_report` writes `report.json` (every figure, with the settings) and `report.md`
(`report_markdown`: a summary of the parts, then each part's figures and checks as tables). Imports only the
standard library.
"""

from __future__ import annotations

import json
import os


def write_report(report: dict, output_dir: str) -> None:
    """Writes `report.json` and `report.md` into `output_dir`, each atomically (a killed run leaves whole files)."""
    os.makedirs(output_dir, exist_ok=True)
    for name, text in (
        ("report.json", json.dumps(report, indent=2, default=str)),
        ("report.md", report_markdown(report)),
    ):
        temporary = os.path.join(output_dir, name + ".tmp")
        with open(temporary, "w") as handle:
            handle.write(text + "\n")
        os.replace(temporary, os.path.join(output_dir, name))


def report_markdown(report: dict) -> str:
    """The report as Markdown: a summary of the parts, then each part's figures and checks."""
    lines = _summary_lines(report)
    for name, part in report["parts"].items():
        lines += ["", f"## {name.capitalize()}", ""]
        lines += _part_lines(name, part)
    return "\n".join(lines)


def _summary_lines(report: dict) -> list[str]:
    """The title, the command line and a table of the parts' status, seconds, budget and note."""
    lines = [
        "# MimCo GPU check",
        "",
        f"`{report['command']}`, started {report['started']}, {report.get('total_seconds', 0):.0f} s in all; "
        f"device: {report['device']}{' (smoke run: tiny sizes on the CPU)' if report['smoke'] else ''}.",
        "",
        "| part | status | seconds | budget | note |",
        "|---|---|---:|---:|---|",
    ]
    for name, part in report["parts"].items():
        note = part.get("reason") or part.get("error") or part.get("over_budget_note") or ""
        failed = [check["name"] for check in part.get("checks", []) if check["status"] == "failed"]
        if failed:
            note = f"{note} failed: {', '.join(failed)}".strip()
        lines.append(
            f"| {name} | {part['status']} | {part['seconds']:.1f} | {part['budget_seconds']:.0f} | "
            f"{note.replace('|', '/')[:300]} |"
        )
    return lines


def _part_lines(name: str, part: dict) -> list[str]:
    """One part's section: the reason of a skip, or its error, its figures and the table of its checks."""
    if part["status"] == "skipped":
        return [part.get("reason", "skipped")]
    lines = []
    if part.get("error"):
        lines += [f"Failed: {part['error']}", "", "```", part.get("traceback", "").strip(), "```"]
    lines += SECTIONS[name](part)
    if part.get("checks"):
        lines += ["", "| check | status | measured |", "|---|---|---|"]
        for check in part["checks"]:
            detail = check.get("reason") or check.get("error") or _check_detail(check)
            lines.append(f"| {check['name']} | {check['status']} | {detail[:400]} |")
    return lines


def _fmt(value, digits: int = 3) -> str:
    """A figure as the tables show it: "–" for None, yes/no, floats to `digits` places (tiny or huge ones as e)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 10**-digits or abs(value) >= 1e6):
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def _check_detail(check: dict) -> str:
    """A check's measured figures as `key value; ...` (its nested figures are in the JSON only)."""
    skip = {"name", "status", "traceback"}
    parts = []
    for key, value in check.items():
        if key in skip or isinstance(value, (dict, list)):
            continue
        parts.append(f"{key} {_fmt(value)}")
    return "; ".join(parts).replace("|", "/")


# --- the parts' sections ------------------------------------------------------------------------------------------


def _environment_markdown(part: dict) -> list[str]:
    """Versions, the device, its datasheet peak and the table of GEMM rates."""
    keys = ("gpu_name", "gpu_memory_gib", "compute_capability", "multiprocessors", "bf16_supported", "torch")
    keys += ("torch_cuda", "cudnn", "transformers", "torchvision", "cpu_model", "cpu_count")
    lines = [f"- {key}: {_fmt(part.get(key))}" for key in keys if key in part]
    peak = part.get("datasheet_peak_tflops")
    if peak:
        note = f" ({peak['note']})" if peak.get("note") else ""
        lines.append(
            f"- datasheet peak ({peak['part']}, dense): bf16 {_fmt(peak['bf16'], 1)}, fp32 {_fmt(peak['fp32'], 1)}, "
            f"TF32 {_fmt(peak['tf32'], 1)} TFLOP/s{note}"
        )
    else:
        lines.append(f"- datasheet peak: {part.get('datasheet_peak_reason')}")
    lines += ["", "| GEMM | size | TFLOP/s (median) | TFLOP/s (best) | of datasheet |", "|---|---:|---:|---:|---:|"]
    for name, gemm in part.get("gemm", {}).items():
        lines.append(
            f"| {name} | {gemm.get('size', '–')} | {_fmt(gemm.get('tflops_median'))} | "
            f"{_fmt(gemm.get('tflops_best'))} | {_fmt(gemm.get('fraction_of_datasheet'))} |"
        )
    return lines


def _correctness_markdown(part: dict) -> list[str]:
    """The tolerances of the comparisons and the shape they ran at."""
    tolerances = part.get("tolerances")
    if not tolerances:
        return []
    text = (
        f"Tolerances: outputs {tolerances['output_relative']:g}, gradients {tolerances['gradient_relative']:g} "
        f"({tolerances['meaning']}); bf16 loss {tolerances['bf16_loss_relative']:g}; compiled loss "
        f"{tolerances['compile_loss_relative']:g}, gradients {tolerances['compile_gradient_relative']:g}. "
        f"Shape: {part.get('shape')}."
    )
    return [text + (f" Note: {part['note']}." if part.get("note") else "")]


def _throughput_row(name: str, entry: dict, note: str = "") -> str:
    """One row of the throughput table: a timed step's rates and memory."""
    return (
        f"| {name} | {entry['batch_size']} | {_fmt(entry['images_per_second'], 1)} | "
        f"{_fmt(entry['seconds_per_step'], 4)} | {_fmt(entry['achieved_tflops'])} | "
        f"{_fmt(entry.get('mfu_vs_datasheet'))} | {_fmt(entry.get('utilisation_vs_measured_gemm'))} | "
        f"{_fmt(entry.get('peak_memory_mib'), 0)} | {note} |"
    )


def _throughput_markdown(part: dict) -> list[str]:
    """The table of timed steps, then the batch doubling's attempts and what stopped it."""
    lines = [
        f"{part.get('model_preset')} at {part.get('image_size')} px, {part.get('precision')}. FLOPs: "
        f"{part.get('flops_counting')}. Same weights, same inputs: loss {part.get('same_weights_loss')}.",
        "",
        "| variant | batch | images/s | s/step | TFLOP/s | MFU (datasheet) | of measured GEMM | peak MiB | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, entry in part.get("variants", {}).items():
        notes = [f"{key} {_fmt(entry[key])}" for key in ("speedup_vs_eager", "slowdown_vs_eager") if key in entry]
        if "memory_ratio_vs_eager" in entry:
            notes.append(f"memory_ratio_vs_eager {_fmt(entry['memory_ratio_vs_eager'])}")
        if "first_step_seconds_with_compilation" in entry:
            backend = f" ({entry['backend']})" if "backend" in entry else ""
            notes.append(f"compile {entry['first_step_seconds_with_compilation']:.0f} s{backend}")
        lines.append(_throughput_row(name, entry, ", ".join(notes)))
    for stage, found in part.get("max_batch", {}).items():
        for entry in found["tried"]:
            if entry.get("fits"):
                lines.append(_throughput_row(f"{stage}_eager, doubling", entry))
            else:
                lines.append(f"| {stage}_eager, doubling | {entry['batch_size']} | out of memory | | | | | | |")
        lines.append(
            f"| {stage}: largest batch that fits | {found['largest_fitting']} | | | | | | | "
            f"stopped: {found['stopped_because']} |"
        )
    for preset, summary in part.get("compile_modes", {}).items():
        rates = ", ".join(f"{name} {_fmt(value, 1)}" for name, value in summary["images_per_second"].items())
        lines += [
            "",
            f"Whole stage-2 model compiled ({summary['backend']}), {preset}: {summary['graphs']} graph(s), "
            f"{summary['graph_breaks']} graph break(s), {summary['recompilations_while_timing']} recompilation(s) "
            f"while timing; images/s: {rates}.",
        ]
    if part.get("memory_note"):
        lines += ["", part["memory_note"]]
    return lines


def _data_markdown(part: dict) -> list[str]:
    """The loader's source images and its rate against the stage-2 step."""
    lines = [f"{part.get('source_images')}, cropped to {part.get('image_size')} px, batch {part.get('batch_size')}."]
    versus = part.get("versus_step")
    if versus:
        lines += ["", "Loader against the stage-2 step: " + "; ".join(f"{k} {_fmt(v)}" for k, v in versus.items())]
    stage1 = part.get("stage1_versus_step")
    if stage1:
        lines += [
            "",
            "Stage-1 loader against the stage-1 step: " + "; ".join(f"{k} {_fmt(v)}" for k, v in stage1.items()),
        ]
    return lines


def _reproduce_markdown(part: dict) -> list[str]:
    """The command, the devices, the table of the rows that finished and, after a failure, the log's tail."""
    lines = [f"`{part.get('command', '')}`", "", part.get("devices", ""), ""]
    if part.get("reason"):
        lines += [part["reason"], ""]
    lines.append(part.get("table_markdown") or "No row finished.")
    if part.get("log_tail"):
        lines += ["", "```", part["log_tail"].strip()[-2000:], "```"]
    return lines


SECTIONS = {
    "environment": _environment_markdown,
    "correctness": _correctness_markdown,
    "throughput": _throughput_markdown,
    "data": _data_markdown,
    "reproduce": _reproduce_markdown,
}


__all__ = ["report_markdown", "write_report"]

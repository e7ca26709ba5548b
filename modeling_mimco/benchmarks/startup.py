"""How long each console command takes to answer `--help`: the start-up a user waits for before any work.

    python -m modeling_mimco.benchmarks.startup                      # this checkout
    python -m modeling_mimco.benchmarks.startup --source OTHER_CLONE # another checkout, for a before / after table

Each command runs as `python -c "...; from modeling_mimco.commands.MODULE import cli; cli()"` with `--help`, in a
fresh process whose working folder is `--source` (so that folder's package is the one imported), `--repeats` times;
the table gives the best wall time and the best CPU time (user + system) of the child. CPU time moves far less than
wall time when other work shares the machine. Nothing is asserted: the numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

from modeling_mimco.commands import CONSOLE_COMMANDS


def time_help(module: str, command: str, source: str, repeats: int) -> tuple[float, float, bool]:
    """Best wall and CPU seconds of `command --help` over `repeats` fresh processes, and whether each printed usage."""
    code = f"import sys; sys.argv = [{command!r}, '--help']; from {module} import cli; cli()"
    walls, cpus, ok = [], [], True
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        process = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        ok = ok and process.returncode == 0 and "usage:" in process.stdout
    return min(walls), min(cpus), ok


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=os.getcwd(), help="The checkout whose package is timed (default: here).")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.2f}; {args.source}")
    print("| command | wall s | CPU s |\n|---|---:|---:|")
    rows = []
    for module, command in CONSOLE_COMMANDS.items():
        wall, cpu, ok = time_help(module, command, args.source, args.repeats)
        rows.append({"command": command, "wall_seconds": wall, "cpu_seconds": cpu, "printed_usage": ok})
        print(f"| `{command} --help` | {wall:.2f} | {cpu:.2f} |" + ("" if ok else " (no usage printed)"), flush=True)
    return rows


if __name__ == "__main__":
    main()

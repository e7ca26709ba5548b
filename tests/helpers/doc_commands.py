"""The shell commands and relative links of the repository's Markdown files, and how `tests/test_docs.py` checks them.

Commands come from fenced ```bash / ```sh / ```shell / ```console blocks; each one is sorted into a kind:

- `make TARGET...`: the targets must be rules of the Makefile (from `make -p`'s database, nothing is run);
- a program of the package (a console command of setup.cfg, `python scripts/NAME.py`, `python -m MODULE`, any of
  them behind `accelerate launch` or `torchrun`, whose own flags are parsed by their own parsers): its arguments go
  to the program's parser, in a subprocess (`python tests/helpers/doc_commands.py RESULTS_JSON < COMMANDS_JSON`) that
  imports each program's module once and stops every command as soon as its arguments are parsed;
- a general tool of the allow-list (`pip`, `git`, `cd`, ...): skipped, with the reason;
- anything else: a failure, so that a new kind of command is not silently ignored.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import contextlib
import dataclasses
import io
import json
import os
import re
import shlex
import subprocess
import sys
import traceback
import unicodedata
from pathlib import Path
from urllib.parse import unquote


REPO = Path(__file__).resolve().parents[2]

SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "shell-session", "zsh"}

# General tools the docs may show; their commands are not checked. Anything not here and not recognised fails.
SKIPPED_PROGRAMS = {
    "pip": "package installation",
    "pip3": "package installation",
    "git": "version control",
    "cd": "changes folder",
    "export": "sets a variable",
    "source": "shell built-in",
    "ls": "general tool",
    "cat": "general tool",
    "cp": "general tool",
    "mv": "general tool",
    "mkdir": "general tool",
    "rm": "general tool",
    "echo": "general tool",
    "tee": "general tool",
    "head": "general tool",
    "tail": "general tool",
    "tar": "general tool",
    "wget": "download tool",
    "curl": "download tool",
    "huggingface-cli": "Hub client",
    "hf": "Hub client",
    "pytest": "the test runner",
    "ruff": "the linter",
    "tensorboard": "the tracker's viewer",
    "nvidia-smi": "driver tool",
    "sbatch": "cluster scheduler",
    "scontrol": "cluster scheduler",
}
# `python -m MODULE` for modules that are not the package's
SKIPPED_PYTHON_MODULES = {
    "pip": "package installation",
    "venv": "creates a virtual environment",
    "pytest": "the test runner",
    "build": "builds a wheel",
    "torch.utils.collect_env": "environment report",
}
# Commands that run the rest of their arguments as a command.
WRAPPERS = {"env", "nohup", "time", "srun"}
PYTHON_NAME = re.compile(r"^python(3(\.\d+)?)?$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# A shell expansion standing for a value (`$VAR`, `${VAR}`, `$(cmd)`, `$((a * b))`): replaced by this placeholder.
SHELL_EXPANSION = re.compile(r"\$\(\([^)]*\)\)|\$\([^)]*\)|\$\{\w+\}|\$\w+")
EXPANSION_PLACEHOLDER = "1"


@dataclasses.dataclass
class DocCommand:
    """One command of a Markdown file: `file` (relative to the repository), the `line` it starts on, its text and
    its words after the shell's quoting, prompt and leading variable assignments are taken off."""

    file: str
    line: int
    text: str
    words: list[str]
    id: str = ""


@dataclasses.dataclass
class Check:
    """What to do with a command: `kind` is "make", "parse", "skip" or "unknown"."""

    kind: str
    reason: str = ""
    module: str = ""
    argv: list[str] = dataclasses.field(default_factory=list)
    targets: list[str] = dataclasses.field(default_factory=list)


def markdown_files(root: Path = REPO) -> list[Path]:
    """README.md, docs/**/*.md and model_cards/**/README.md, those that exist, sorted."""
    files = [root / "README.md"] if (root / "README.md").is_file() else []
    files += sorted((root / "docs").rglob("*.md")) if (root / "docs").is_dir() else []
    files += sorted((root / "model_cards").rglob("README.md")) if (root / "model_cards").is_dir() else []
    return files


FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")


def fenced_blocks(text: str):
    """(language, [(line number, line)]) for each fenced block; an unclosed block runs to the end of the file."""
    fence, language, lines = None, "", []
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence, language, lines = match.group(1), match.group(2).lower(), []
        elif match and line.strip().startswith(fence[0] * len(fence)) and not match.group(2):
            yield language, lines
            fence = None
        else:
            lines.append((number, line))
    if fence is not None:
        yield language, lines


def logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Backslash-continued lines joined (and lines joined while a quote is open), with the first line's number."""
    joined, start, current = [], None, ""
    for number, line in lines:
        if start is None:
            start, current = number, line
        else:
            current += "\n" + line
        if current.endswith("\\"):
            current = current[:-1]
            continue
        try:
            shlex.split(current, comments=True)
        except ValueError:  # a quote still open: the command goes on on the next line
            continue
        joined.append((start, current.replace("\\\n", " ").replace("\n", " ")))
        start, current = None, ""
    if start is not None:
        joined.append((start, current))
    return joined


CHAIN_OPERATORS = {"&&", "||", ";", "|", "&"}
REDIRECTIONS = re.compile(r"^(\d?>>?|&>|<|\d?>&\d?)(.*)$")


def split_chain(words: list[str]) -> list[list[str]]:
    """A command line's words split at `&&`, `||`, `;`, `|` and `&`, with redirections (`> file`, `2>&1`) removed."""
    commands, current = [], []
    index = 0
    while index < len(words):
        word = words[index]
        if word in CHAIN_OPERATORS:
            commands.append(current)
            current = []
        elif word.endswith(";") and len(word) > 1:
            current.append(word[:-1])
            commands.append(current)
            current = []
        elif REDIRECTIONS.match(word):
            operator, target = REDIRECTIONS.match(word).groups()
            if not target and not operator.endswith("&") and not re.search(r">&\d$", operator):
                index += 1  # `> file`: the file is the next word
        else:
            current.append(word)
        index += 1
    commands.append(current)
    return [command for command in commands if command]


def strip_prefix(words: list[str]) -> list[str]:
    """The words without a `$ ` prompt and leading `NAME=value` assignments."""
    words = list(words)
    if words and words[0] == "$":
        words = words[1:]
    while words and ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]
    return words


def commands_of_text(text: str, file: str) -> list[DocCommand]:
    """The commands of one Markdown file's shell blocks, in order; see the module's docstring."""
    commands = []
    for language, lines in fenced_blocks(text):
        if language not in SHELL_LANGUAGES:
            continue
        if any(line.lstrip().startswith("$ ") for _, line in lines):
            # a console transcript: only the prompted lines (and their continuations) are commands
            kept, going_on = [], False
            for number, line in lines:
                if line.lstrip().startswith("$ "):
                    kept.append((number, line.lstrip()[2:]))
                    going_on = line.rstrip().endswith("\\")
                elif going_on:
                    kept.append((number, line))
                    going_on = line.rstrip().endswith("\\")
            lines = kept
        for number, line in logical_lines(lines):
            commands.extend(commands_of_line(line, file, number))
    seen: dict[str, int] = {}
    for command in commands:
        base = f"{command.file}:{command.line}"
        seen[base] = seen.get(base, 0) + 1
        command.id = base if seen[base] == 1 else f"{base}#{seen[base]}"
    return commands


def commands_of_line(line: str, file: str, number: int) -> list[DocCommand]:
    if not line.strip() or line.lstrip().startswith("#"):
        return []
    line = SHELL_EXPANSION.sub(EXPANSION_PLACEHOLDER, line)
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        words = line.split()
    found = []
    for part in split_chain(words):
        part = strip_prefix(part)
        if part:
            found.append(DocCommand(file=file, line=number, text=shlex.join(part), words=part))
    return found


def collect_commands(root: Path = REPO) -> list[DocCommand]:
    commands = []
    for path in markdown_files(root):
        commands.extend(commands_of_text(path.read_text(encoding="utf-8"), str(path.relative_to(root))))
    return commands


# --- sorting commands into checks ---------------------------------------------------------------------------------


def console_scripts(root: Path = REPO) -> dict[str, str]:
    """setup.cfg's console commands: name -> module."""
    config = configparser.ConfigParser()
    config.read(root / "setup.cfg")
    scripts = {}
    for line in config.get("options.entry_points", "console_scripts", fallback="").splitlines():
        if "=" in line:
            name, target = (part.strip() for part in line.split("=", 1))
            scripts[name] = target.split(":")[0]
    return scripts


def script_module(path: Path) -> str | None:
    """The module whose `cli` (or `main`) a thin script of scripts/ runs, from its `from MODULE import cli` line."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and any(a.name in ("cli", "main") for a in node.names):
            return node.module
    return None


def accelerate_program(words: list[str]) -> tuple[str, bool, list[str]]:
    """`accelerate launch`'s flags parsed by accelerate's own parser: (script or module, is a module, its args)."""
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    args = parse_launcher(parser, words, "accelerate launch")
    return args.training_script, bool(args.module), list(args.training_script_args)


def torchrun_program(words: list[str]) -> tuple[str, bool, list[str]]:
    from torch.distributed.run import get_args_parser

    args = parse_launcher(get_args_parser(), words, "torchrun")
    if args.no_python:
        raise ValueError("torchrun --no_python: not a Python program")
    return args.training_script, bool(args.module), list(args.training_script_args)


def parse_launcher(parser: argparse.ArgumentParser, words: list[str], name: str) -> argparse.Namespace:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            return parser.parse_args(words)
        except SystemExit:
            message = stderr.getvalue().strip().splitlines()
            raise ValueError(f"{name} rejects its flags: {message[-1] if message else 'exit 2'}") from None


def python_program(words: list[str]) -> tuple[str, bool, list[str]] | None:
    """`python [flags] SCRIPT args` or `python [flags] -m MODULE args` -> (script or module, is a module, args)."""
    index = 1
    while index < len(words):
        word = words[index]
        if word == "-m" and index + 1 < len(words):
            return words[index + 1], True, words[index + 2 :]
        if word == "-c":
            return None
        if word in ("-X", "-W"):
            index += 2
        elif word.startswith("-"):
            index += 1
        else:
            return word, False, words[index + 1 :]
    return None


def program_check(target: str, is_module: bool, argv: list[str], root: Path) -> Check:
    """The check of a Python program given as a script path or a module name."""
    if is_module:
        if target in SKIPPED_PYTHON_MODULES:
            return Check("skip", reason=f"python -m {target}: {SKIPPED_PYTHON_MODULES[target]}")
        if not target.startswith("modeling_mimco"):
            return Check("unknown", reason=f"python -m {target}: not a module of the package nor of the allow-list")
        module_file = root / (target.replace(".", "/") + ".py")
        if not module_file.is_file() and not (root / target.replace(".", "/") / "__init__.py").is_file():
            return Check("unknown", reason=f"python -m {target}: no such module in the repository")
        return Check("parse", module=target, argv=argv)
    path = root / target
    if not target.endswith(".py"):
        return Check("unknown", reason=f"python {target}: not a Python script")
    if not path.is_file():
        return Check("unknown", reason=f"python {target}: no such script in the repository")
    module = script_module(path)
    if module is None:
        return Check("unknown", reason=f"python {target}: cannot tell which module's parser it runs")
    return Check("parse", module=module, argv=argv)


def classify(words: list[str], root: Path = REPO) -> Check:
    """The check of one command's words (see the module docstring)."""
    program = os.path.basename(words[0])
    if program in WRAPPERS:
        rest = words[1:]
        while rest and (rest[0].startswith("-") or ENV_ASSIGNMENT.match(rest[0])):
            rest = rest[1:]
        return classify(rest, root) if rest else Check("skip", reason=f"{program} alone")
    if program in ("bash", "sh") and len(words) >= 3 and words[1] == "-c":
        inner = [command for command in commands_of_line(words[2], "", 0)]
        checks = [classify(command.words, root) for command in inner]
        if len(checks) != 1:
            return Check("unknown", reason=f"{program} -c with {len(checks)} commands: check them one by one")
        return checks[0]
    if program == "make":
        targets, index = [], 1
        while index < len(words):
            word = words[index]
            if word in ("-C", "-f", "-j", "-I", "-o", "-W") and index + 1 < len(words):
                return Check("unknown", reason=f"make {word}: another Makefile or folder is not checked")
            if not word.startswith("-") and not ENV_ASSIGNMENT.match(word):
                targets.append(word)
            index += 1
        return Check("make", targets=targets)
    scripts = console_scripts(root)
    if program in scripts:
        return Check("parse", module=scripts[program], argv=words[1:])
    if program.startswith("mimco-"):
        return Check("unknown", reason=f"{program}: no such console command in setup.cfg")
    if PYTHON_NAME.match(program):
        found = python_program(words)
        if found is None:
            return Check("unknown", reason="python without a script or -m module")
        return program_check(*found, root=root)
    if program == "accelerate":
        if len(words) < 2 or words[1] != "launch":
            return Check("skip", reason=f"accelerate {' '.join(words[1:2])}: not a launch")
        try:
            return program_check(*accelerate_program(words[2:]), root=root)
        except ValueError as error:
            return Check("unknown", reason=str(error))
    if program == "torchrun":
        try:
            return program_check(*torchrun_program(words[1:]), root=root)
        except ValueError as error:
            return Check("unknown", reason=str(error))
    if program in SKIPPED_PROGRAMS:
        return Check("skip", reason=f"{program}: {SKIPPED_PROGRAMS[program]}")
    return Check("unknown", reason=f"{program}: neither a program of the package nor a tool of the allow-list")


def make_targets(root: Path = REPO) -> set[str]:
    """The rule names of the Makefile, from `make -p`'s database of a run that makes nothing (`-q`, target `:`);
    without a `make` program, the `NAME:` lines of the Makefile."""
    try:
        result = subprocess.run(
            ["make", "-pRrq", "-f", "Makefile", ":"], cwd=root, capture_output=True, text=True, timeout=60
        )
        database = result.stdout
    except FileNotFoundError:
        database = (root / "Makefile").read_text(encoding="utf-8")
    targets, previous = set(), ""
    for line in database.splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-/%]+)\s*:(?!=)", line)
        if match and previous != "# Not a target:":
            targets.add(match.group(1))
        previous = line
    return targets


# --- the parse worker (runs in a subprocess) ----------------------------------------------------------------------


class ArgumentsParsed(BaseException):
    """Raised as soon as a program's arguments are parsed, so that nothing of the job runs."""


DEVICE_MISSING = re.compile(
    r"(cuda|gpu|npu|xpu|mps)\W.*(not available|no .*device)|(doesn't|does not|cannot|can't) support .*(bf16|fp16|gpu|cuda)",
    re.IGNORECASE,
)
PATH_MISSING = re.compile(
    r"no such file|does not exist|doesn't exist|not found|cannot find|can't find|couldn't find|could not find|"
    r"not a (local )?(folder|directory|file)|no such (folder|directory)|is not a valid (model|repo)",
    re.IGNORECASE,
)


def _environment_only(error: BaseException, argv: list[str]) -> bool:
    """Whether a post-parse error is about this machine (a path that is not here, no GPU) rather than the flags:
    an `OSError`, a device that is not available, or a "not found"-like message that names a value of the command
    line which is no file or folder here."""
    if isinstance(error, OSError):
        return True
    message = str(error)
    if DEVICE_MISSING.search(message):
        return True
    if not PATH_MISSING.search(message):
        return False
    values = [word for word in argv if not word.startswith("-") and len(word) > 1]
    return any(
        re.search(re.escape(value) + r"\b", message) and not (os.path.exists(value) or (REPO / value).exists())
        for value in values
    )


def parse_one(module, argv: list[str]) -> dict:
    """Parses `argv` with the parser of `module`: its `parse_args(argv)` where it has one, else its `main(argv)`
    stopped (by `ArgumentsParsed`) right after `HfArgumentParser.parse_args_into_dataclasses` or argparse returns."""
    from transformers import HfArgumentParser

    original_dataclasses = HfArgumentParser.parse_args_into_dataclasses
    original_known = argparse.ArgumentParser.parse_known_args
    inside = []

    def dataclasses_then_stop(self, *args, **kwargs):
        inside.append(True)
        try:
            original_dataclasses(self, *args, **kwargs)
        finally:
            inside.pop()
        raise ArgumentsParsed()

    def known_then_stop(self, *args, **kwargs):
        parsed = original_known(self, *args, **kwargs)
        if inside:
            return parsed
        raise ArgumentsParsed()

    stderr, stdout = io.StringIO(), io.StringIO()
    own_parse = callable(getattr(module, "parse_args", None))
    if not own_parse:
        HfArgumentParser.parse_args_into_dataclasses = dataclasses_then_stop
        argparse.ArgumentParser.parse_known_args = known_then_stop
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            if own_parse:
                module.parse_args(list(argv))
            elif callable(getattr(module, "main", None)):
                module.main(list(argv))
                return {"status": "error", "message": "main(argv) returned without going through a parser"}
            else:
                return {"status": "error", "message": f"{module.__name__} has neither parse_args nor main"}
    except ArgumentsParsed:
        pass
    except SystemExit as exit_:
        if exit_.code in (0, None):
            return {"status": "ok", "message": "exits 0 (e.g. --help)"}
        lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
        errors = [line for line in lines if "error:" in line]
        message = (errors or lines or [str(exit_.code)])[-1]
        return {"status": "rejected", "message": message}
    except Exception as error:  # noqa: BLE001 (every error is reported with the command)
        if _environment_only(error, argv):
            return {"status": "environment", "message": f"{type(error).__name__}: {error}"}
        if isinstance(error, ValueError):
            return {"status": "rejected", "message": f"{type(error).__name__}: {error}"}
        text = "".join(traceback.format_exception_only(type(error), error)).strip()
        return {"status": "error", "message": text}
    finally:
        HfArgumentParser.parse_args_into_dataclasses = original_dataclasses
        argparse.ArgumentParser.parse_known_args = original_known
    return {"status": "ok", "message": "parsed"}


def worker(requests: list[dict]) -> dict[str, dict]:
    """Each request is {"id", "module", "argv"}; each module is imported once, its commands parsed one by one."""
    import importlib

    results = {}
    by_module: dict[str, list[dict]] = {}
    for request in requests:
        by_module.setdefault(request["module"], []).append(request)
    for name, group in by_module.items():
        sys.argv = [group[0].get("program", name)]  # the program name in the parsers' messages
        try:
            module = importlib.import_module(name)
        except Exception as error:  # noqa: BLE001
            for request in group:
                results[request["id"]] = {"status": "error", "message": f"import {name}: {error!r}"}
            continue
        for request in group:
            results[request["id"]] = parse_one(module, request["argv"])
    return results


def worker_environment() -> dict[str, str]:
    """The environment of the parse worker: offline, expected errors with their type, no launcher's ranks."""
    env = dict(os.environ)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(name, None)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        MIMCO_TRACEBACK="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def run_worker(requests: list[dict], results_file: Path, timeout: float = 300) -> dict[str, dict]:
    """Runs `worker` in a fresh Python (this file as a script) from a scratch folder, so that a program's defaults
    that are relative paths point nowhere of the repository."""
    process = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(results_file)],
        input=json.dumps(requests),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=results_file.parent,
        env={**worker_environment(), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
    )
    if process.returncode != 0 or not results_file.is_file():
        raise RuntimeError(f"the parse worker failed (exit {process.returncode}):\n{process.stderr[-4000:]}")
    return json.loads(results_file.read_text())


# --- links ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DocLink:
    file: str
    line: int
    target: str
    id: str = ""


INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
INLINE_CODE = re.compile(r"(`+).*?\1")


def links_of_text(text: str, file: str) -> list[DocLink]:
    """Relative links (and images) of a Markdown file, outside code blocks and code spans."""
    code_lines = {number for _, lines in fenced_blocks(text) for number, _ in lines}
    fence_lines = {n for n, line in enumerate(text.splitlines(), 1) if FENCE.match(line)}
    links = []
    for number, line in enumerate(text.splitlines(), start=1):
        if number in code_lines or number in fence_lines:
            continue
        line = INLINE_CODE.sub("", line)
        targets = [match.group(1) for match in INLINE_LINK.finditer(line)]
        reference = REFERENCE_LINK.match(line)
        if reference:
            targets.append(reference.group(1))
        for target in targets:
            target = target.strip("<>")
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
                continue  # http:, https:, mailto:, ...
            links.append(DocLink(file=file, line=number, target=target))
    seen: dict[str, int] = {}
    for link in links:
        base = f"{link.file}:{link.line}:{link.target}"
        seen[base] = seen.get(base, 0) + 1
        link.id = base if seen[base] == 1 else f"{base}#{seen[base]}"
    return links


def collect_links(root: Path = REPO) -> list[DocLink]:
    links = []
    for path in markdown_files(root):
        links.extend(links_of_text(path.read_text(encoding="utf-8"), str(path.relative_to(root))))
    return links


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup taken off, lower-case, punctuation but `-` and `_` removed, spaces to
    `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").strip().lower()
    kept = []
    for character in text:
        category = unicodedata.category(character)
        if character in "-_ " or category[0] in "LN" or category == "Mn":
            kept.append(character)
    return "".join(kept).replace(" ", "-")


def anchors_of_text(text: str) -> set[str]:
    """The anchors a Markdown file offers: its headings' slugs (repeats numbered -1, -2, ... as GitHub does) and
    explicit `id=` / `name=` attributes."""
    code_lines = {number for _, lines in fenced_blocks(text) for number, _ in lines}
    anchors, counts = set(), {}
    for number, line in enumerate(text.splitlines(), start=1):
        if number in code_lines:
            continue
        match = re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = github_slug(match.group(1))
            count = counts.get(slug, 0)
            anchors.add(slug if count == 0 else f"{slug}-{count}")
            counts[slug] = count + 1
        for attribute in re.finditer(r"""\b(?:id|name)\s*=\s*["']([^"']+)["']""", line):
            anchors.add(attribute.group(1))
    return anchors


def link_problem(link: DocLink, root: Path = REPO) -> str | None:
    """What is wrong with a relative link, or None."""
    path_part, _, anchor = link.target.partition("#")
    path_part = unquote(path_part.split("?", 1)[0])
    source = root / link.file
    if path_part:
        target = (root / path_part.lstrip("/")) if path_part.startswith("/") else (source.parent / path_part)
    else:
        target = source
    if not target.exists():
        return f"{link.target}: no such file or folder ({target.relative_to(root) if target.is_relative_to(root) else target})"
    if anchor and target.is_file() and target.suffix.lower() in (".md", ".markdown"):
        anchors = anchors_of_text(target.read_text(encoding="utf-8"))
        if unquote(anchor).lower() not in anchors:
            return f"{link.target}: no heading with anchor #{anchor} in {target.relative_to(root)}"
    return None


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.write_text(json.dumps(worker(json.loads(sys.stdin.read()))))

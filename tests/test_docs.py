"""Every shell command and every relative link of README.md, docs/**/*.md and model_cards/**/README.md still works.

Commands are checked through the real entry points without running anything (tests/helpers/doc_commands.py):
`make TARGET` against the Makefile's rules; the package's programs (console commands, `python scripts/NAME.py`,
`python -m modeling_mimco...`, behind `accelerate launch` or `torchrun` too) by their own argument parsers, in one
subprocess that imports each program's module once; general tools of an allow-list are skipped with the reason;
anything else fails. Links: the file exists, and a `#anchor` is a heading of the target (GitHub's slugs).
"""

from __future__ import annotations

import pytest
from helpers import doc_commands


# Known problems of today's docs, by the test's id ("FILE:LINE" for a command, "FILE:LINE:TARGET" for a link): these
# cases are expected to fail until the docs are fixed. Empty the entries as the docs are fixed (an entry whose case
# passes again shows up as XPASS).
KNOWN_DOC_PROBLEMS: dict[str, str] = {}

COMMANDS = doc_commands.collect_commands()
LINKS = doc_commands.collect_links()


def _params(items):
    params = []
    for item in items:
        marks = []
        if item.id in KNOWN_DOC_PROBLEMS:
            marks.append(pytest.mark.xfail(reason=KNOWN_DOC_PROBLEMS[item.id], strict=False))
        params.append(pytest.param(item, id=item.id, marks=marks))
    return params


@pytest.fixture(scope="module")
def checks():
    """Each command's check, by id (the launchers' own flags are parsed here, by accelerate's and torchrun's
    parsers)."""
    return {command.id: doc_commands.classify(command.words) for command in COMMANDS}


# Made-up commands parsed with the docs' ones, for the worker's own test (a misspelt flag, a bad choice, a missing file).
_CONVERT = "modeling_mimco.commands.convert_checkpoint"
SELF_TEST = [
    {"id": "self-test:good", "module": _CONVERT, "argv": ["--input_path", "no/such.pth", "--output_path", "o"]},
    {
        "id": "self-test:misspelt",
        "module": _CONVERT,
        "argv": ["--input_path", "a.pth", "--output_path", "o", "--no_such_flag"],
    },
    {"id": "self-test:choice", "module": _CONVERT, "argv": ["--input_path", "a", "--output_path", "o", "--to", "x"]},
]


@pytest.fixture(scope="module")
def parse_results(checks, tmp_path_factory):
    """Every package program's command parsed by its parser, in one subprocess: {id: {"status", "message"}}."""
    requests = [
        {"id": command_id, "module": check.module, "argv": check.argv, "program": check.module.rsplit(".", 1)[-1]}
        for command_id, check in checks.items()
        if check.kind == "parse"
    ]
    return doc_commands.run_worker(requests + SELF_TEST, tmp_path_factory.mktemp("doc-commands") / "results.json")


@pytest.fixture(scope="module")
def makefile_targets():
    return doc_commands.make_targets()


def test_docs_have_commands_and_links():
    """The collection itself works: the Markdown files are found, and the README (where there is one) has commands."""
    assert doc_commands.markdown_files(), "no README.md nor docs/**/*.md found"
    if (doc_commands.REPO / "README.md").is_file():
        assert any(command.file == "README.md" for command in COMMANDS)


@pytest.mark.parametrize("command", _params(COMMANDS))
def test_doc_command(command, checks, parse_results, makefile_targets):
    check = checks[command.id]
    where = f"{command.id}: {command.text}"
    if check.kind == "skip":
        pytest.skip(f"{where}: not checked ({check.reason})")
    assert check.kind != "unknown", f"{where}: {check.reason}"
    if check.kind == "make":
        assert makefile_targets, "the Makefile has no rules (or `make -p` failed)"
        missing = [target for target in check.targets if target not in makefile_targets]
        assert not missing, f"{where}: no such Makefile target {missing}"
        return
    result = parse_results[command.id]
    assert result["status"] in ("ok", "environment"), (
        f"{where}\n{check.module} {result['status']}: {result['message']}"
    )


@pytest.mark.parametrize("link", _params(LINKS))
def test_doc_link(link):
    problem = doc_commands.link_problem(link)
    assert problem is None, f"{link.file}:{link.line}: {problem}"


# --- the parsing helpers themselves, on made-up Markdown -------------------------------------------------------------


def test_commands_are_split_and_stripped():
    text = "\n".join(
        [
            "```bash",
            "# a comment",
            "OMP_NUM_THREADS=1 python scripts/run_pretraining.py --teacher_name_or_path t \\",
            "    --output_dir 'out dir'  # trailing comment",
            "",
            "cd x && make demo; pip install . | tee log 2>&1",
            "```",
            "```console",
            "$ mimco-probe --help",
            "usage: ...",
            "```",
            "```python",
            "make nothing",
            "```",
        ]
    )
    commands = doc_commands.commands_of_text(text, "X.md")
    assert [(command.id, command.words[0]) for command in commands] == [
        ("X.md:3", "python"),
        ("X.md:6", "cd"),
        ("X.md:6#2", "make"),
        ("X.md:6#3", "pip"),
        ("X.md:6#4", "tee"),
        ("X.md:9", "mimco-probe"),
    ]
    assert commands[0].words[-2:] == ["--output_dir", "out dir"]
    assert commands[4].words == ["tee", "log"]


def test_commands_are_sorted_into_checks():
    classify = doc_commands.classify
    check = classify(
        ["accelerate", "launch", "--num_processes", "2", "--multi_gpu", "scripts/run_pretraining.py", "-x"]
    )
    assert (check.kind, check.module, check.argv) == ("parse", "modeling_mimco.commands.run_pretraining", ["-x"])
    check = classify(["accelerate", "launch", "-m", "modeling_mimco.commands.run_finetuning", "--a"])
    assert (check.kind, check.module, check.argv) == ("parse", "modeling_mimco.commands.run_finetuning", ["--a"])
    check = classify(["torchrun", "--nproc_per_node", "2", "scripts/run_linear_probe.py", "--b"])
    assert (check.kind, check.module, check.argv) == ("parse", "modeling_mimco.commands.run_linear_probe", ["--b"])
    assert classify(["mimco-card", "--c"]).module == "modeling_mimco.commands.make_model_card"
    assert classify([".venv/bin/python", "-u", "scripts/demo.py"]).module == "modeling_mimco.experiments.demo"
    assert classify(["make", "cards", "X=1"]).targets == ["cards"]
    assert classify(["git", "clone", "x"]).kind == "skip"
    assert classify(["python", "-m", "pip", "install", "x"]).kind == "skip"
    assert classify(["frobnicate", "--now"]).kind == "unknown"
    assert classify(["mimco-nothing"]).kind == "unknown"
    assert classify(["python", "scripts/no_such_script.py"]).kind == "unknown"


def test_parse_worker_tells_bad_flags_from_missing_files(parse_results):
    """A misspelt flag and a bad choice are rejected; a checkpoint that is not on this machine is not (the cases
    run in the same worker as the docs' commands, see `SELF_TEST`)."""
    good, misspelt, choice = (parse_results[f"self-test:{name}"] for name in ("good", "misspelt", "choice"))
    assert good["status"] in ("ok", "environment"), good
    assert misspelt["status"] == "rejected" and "--no_such_flag" in misspelt["message"], misspelt
    assert choice["status"] == "rejected" and "--to" in choice["message"], choice


def test_github_slugs():
    assert doc_commands.github_slug("Dense transfer: segmentation of digit canvases") == (
        "dense-transfer-segmentation-of-digit-canvases"
    )
    assert doc_commands.github_slug("`mimco-convert` and the Hub (PEFT)") == "mimco-convert-and-the-hub-peft"
    assert doc_commands.anchors_of_text("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}

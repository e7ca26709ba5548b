"""The README's Python example runs as printed."""

import re
from pathlib import Path

import pytest


README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.DOTALL).group(1)
    assert first_block.splitlines()[0].startswith("make demo") and first_block.splitlines()[1].startswith("make test")
    example = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    assert len(example.strip().splitlines()) <= 10
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exec(compile(example, str(README), "exec"), {"__name__": "readme_example"})
    assert (tmp_path / "mimco-tiny" / "model.safetensors").is_file()
    printed = capsys.readouterr().out
    assert printed.count("tensor(") == 3

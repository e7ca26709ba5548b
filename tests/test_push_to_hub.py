"""Hub upload: the file list, the checks on the folder, one commit, and no token anywhere. No test reaches the
network: `HfApi` is replaced, and sockets refuse to connect."""

import json
import socket
from pathlib import Path

import pytest
from helpers.scripts import load_script
from transformers import ViTImageProcessor

from modeling_mimco import MimCoConfig, MimCoModel, hub


ROOT = Path(__file__).resolve().parents[1]
FAKE_TOKEN = "hf_" + "Zq7" * 12


@pytest.fixture(scope="module")
def script():
    return load_script("push_to_hub")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny MimCoModel saved with its processor and card; tests copy it before changing anything."""
    folder = tmp_path_factory.mktemp("saved") / "ckpt"
    config = MimCoConfig(
        image_size=32,
        patch_size=4,
        mask_patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    MimCoModel(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    hub.build_model_card(folder, repo_id="me/mimco-tiny").save(folder / "README.md")
    return folder


@pytest.fixture
def checkpoint(saved_model, tmp_path):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(saved_model, folder)
    return folder


class NoNetworkApi:
    def __init__(self, *args, **kwargs):
        raise AssertionError("HfApi must not be created during a dry run")


@pytest.fixture
def no_network(monkeypatch):
    monkeypatch.setattr(hub, "HfApi", NoNetworkApi)

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def expected_files(folder: Path) -> set[str]:
    """What must be uploaded: the config, the weights, the processor, the card, and every code file that
    `save_pretrained` wrote for remote code (the auto_map modules and what they import)."""
    config = json.loads((folder / "config.json").read_text())
    auto_map_files = {reference.rsplit(".", 1)[0] + ".py" for reference in config["auto_map"].values()}
    code_files = {path.name for path in folder.glob("*.py")}
    assert auto_map_files <= code_files
    weights = {path.name for path in folder.glob("*.safetensors")}
    assert weights
    return {"config.json", "preprocessor_config.json", "README.md"} | weights | code_files


def test_dry_run_lists_the_files_and_uploads_nothing(script, checkpoint, no_network, capsys):
    expected = expected_files(checkpoint)
    (checkpoint / "optimizer.pt").write_bytes(b"\x80\x04not for upload")
    (checkpoint / "logs").mkdir()
    (checkpoint / "logs" / "events.txt").write_text("step 1")

    files = script.main(["--checkpoint_dir", str(checkpoint), "--hub_model_id", "me/mimco-tiny", "--dry_run"])
    output = capsys.readouterr().out
    assert set(files) == expected
    for name in expected:
        assert f"  {name}\n" in output
    assert "optimizer.pt" not in files and "logs/events.txt" not in files
    assert "Left out" in output and "optimizer.pt" in output
    assert "nothing was uploaded" in output


@pytest.mark.parametrize(
    "remove, message",
    [
        ("README.md", "README.md"),
        ("preprocessor_config.json", "preprocessor_config.json"),
        ("model.safetensors", "safetensors"),
        ("teacher.py", "teacher.py"),
        ("config.json", "config.json"),
    ],
)
def test_missing_files_are_named(script, checkpoint, no_network, remove, message):
    (checkpoint / remove).unlink()
    with pytest.raises(SystemExit, match=message) as error:
        script.main(["--checkpoint_dir", str(checkpoint), "--hub_model_id", "me/mimco-tiny", "--dry_run"])
    assert "missing" in str(error.value)


def test_config_without_auto_map_is_refused(script, checkpoint, no_network):
    config = json.loads((checkpoint / "config.json").read_text())
    del config["auto_map"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="auto_map"):
        script.main(["--checkpoint_dir", str(checkpoint), "--hub_model_id", "me/mimco-tiny", "--dry_run"])


class RecordingApi:
    calls: list = []

    def __init__(self, *args, **kwargs):
        RecordingApi.calls.append(("init", args, kwargs))

    def create_repo(self, **kwargs):
        RecordingApi.calls.append(("create_repo", kwargs))

    def create_commit(self, **kwargs):
        RecordingApi.calls.append(("create_commit", kwargs))
        return "https://huggingface.co/me/mimco-tiny/commit/0"

    def upload_folder(self, **kwargs):
        RecordingApi.calls.append(("upload_folder", kwargs))


def test_push_makes_one_commit_without_printing_the_token(script, checkpoint, monkeypatch, capsys, caplog):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    RecordingApi.calls = []
    dry_files = script.main(["--checkpoint_dir", str(checkpoint), "--hub_model_id", "me/mimco-tiny", "--dry_run"])
    assert RecordingApi.calls == []

    files = script.main(
        [
            "--checkpoint_dir",
            str(checkpoint),
            "--hub_model_id",
            "me/mimco-tiny",
            "--private",
            "--commit_message",
            "First upload",
        ]
    )
    assert files == dry_files
    names = [call[0] for call in RecordingApi.calls]
    assert names.count("create_repo") == 1 and names.count("create_commit") == 1 and "upload_folder" not in names
    create_repo = next(call[1] for call in RecordingApi.calls if call[0] == "create_repo")
    assert create_repo["repo_id"] == "me/mimco-tiny" and create_repo["private"] is True
    commit = next(call[1] for call in RecordingApi.calls if call[0] == "create_commit")
    assert commit["commit_message"] == "First upload"
    assert sorted(operation.path_in_repo for operation in commit["operations"]) == sorted(dry_files)

    captured = capsys.readouterr()
    assert FAKE_TOKEN not in captured.out + captured.err + caplog.text
    assert not any(
        FAKE_TOKEN in path.read_bytes().decode("latin-1") for path in checkpoint.rglob("*") if path.is_file()
    )


def test_files_holding_a_token_are_refused(script, checkpoint, monkeypatch, no_network):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    with open(checkpoint / "README.md", "a") as card:
        card.write(f"\nlogin with {FAKE_TOKEN}\n")
    with pytest.raises(SystemExit, match="README.md") as error:
        script.main(["--checkpoint_dir", str(checkpoint), "--hub_model_id", "me/mimco-tiny", "--dry_run"])
    assert FAKE_TOKEN not in str(error.value)


def test_push_without_a_token_is_refused(script, checkpoint, monkeypatch, no_network):
    monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(SystemExit, match="HF_TOKEN"):
        script.main(["--checkpoint_dir", str(checkpoint), "--hub_model_id", "me/mimco-tiny"])

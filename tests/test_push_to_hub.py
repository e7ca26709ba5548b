"""Hub upload: the file list, the checks on the folder, one commit, and no token anywhere. No test here reaches the
network: `HfApi` is replaced, and sockets refuse to connect (tests/test_hub_server.py runs real uploads against a
local fake Hub)."""

import json
import socket
from pathlib import Path

import pytest
from helpers.scripts import load_script
from huggingface_hub import CommitInfo, ModelCard
from transformers import ViTImageProcessor

from modeling_mimco import MimCoConfig, MimCoModel
from modeling_mimco.hub import model_card, upload


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
    model_card.build_model_card(folder, repo_id="me/mimco-tiny").save(folder / "README.md")
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
    monkeypatch.setattr(upload, "HfApi", NoNetworkApi)

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


def listed_files(output: str) -> list[str]:
    """The file names that `push_to_hub` prints, one per indented line (without a note in parentheses)."""
    return [line.strip().split(" (")[0] for line in output.splitlines() if line.startswith("  ")]


def test_dry_run_lists_the_files_and_uploads_nothing(script, checkpoint, no_network, capsys):
    expected = expected_files(checkpoint)
    (checkpoint / "optimizer.pt").write_bytes(b"\x80\x04not for upload")
    (checkpoint / "logs").mkdir()
    (checkpoint / "logs" / "events.txt").write_text("step 1")

    assert script.main(["--checkpoint_dir", str(checkpoint), "--hub_model_id", "me/mimco-tiny", "--dry_run"]) is None
    output = capsys.readouterr().out
    files = listed_files(output)
    assert set(files) == expected and len(files) == len(expected)
    assert files == upload.plan_upload(checkpoint, "me/mimco-tiny").files
    assert "optimizer.pt" not in files and "logs/events.txt" not in files
    assert "Left out (2 files, kept local): logs/ (1 file), optimizer.pt" in output
    assert "nothing was uploaded" in output


def test_dry_run_without_a_card_would_generate_it_and_writes_nothing(script, checkpoint, no_network, capsys):
    expected = expected_files(checkpoint)
    (checkpoint / "README.md").unlink()
    before = sorted(path.name for path in checkpoint.iterdir())
    script.main(["--checkpoint_dir", str(checkpoint), "--hub_model_id", "me/mimco-tiny", "--dry_run"])
    output = capsys.readouterr().out
    assert set(listed_files(output)) == expected
    assert "  README.md (model card generated from config.json)" in output
    assert "no README.md written" in output
    assert sorted(path.name for path in checkpoint.iterdir()) == before

    plan = upload.plan_upload(checkpoint, "me/mimco-tiny")
    assert plan.generated_card is not None and plan.generated_card.data.library_name == "transformers"
    assert 'repo_id = "me/mimco-tiny"' in plan.generated_card.text


@pytest.mark.parametrize(
    "remove, message",
    [
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


def test_missing_config_and_card_are_both_named(script, checkpoint, no_network):
    (checkpoint / "config.json").unlink()
    (checkpoint / "README.md").unlink()
    with pytest.raises(SystemExit, match="missing: config.json .*README.md"):
        script.main(["--checkpoint_dir", str(checkpoint), "--hub_model_id", "me/mimco-tiny", "--dry_run"])


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
        return CommitInfo(
            commit_url="https://huggingface.co/me/mimco-tiny/commit/" + "0" * 40,
            commit_message=kwargs["commit_message"],
            commit_description="",
            oid="0" * 40,
        )

    def upload_folder(self, **kwargs):
        RecordingApi.calls.append(("upload_folder", kwargs))


def test_push_makes_one_commit_without_printing_the_token(script, checkpoint, monkeypatch, capsys, caplog):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(upload, "HfApi", RecordingApi)
    RecordingApi.calls = []
    script.main(["--checkpoint_dir", str(checkpoint), "--hub_model_id", "me/mimco-tiny", "--dry_run"])
    dry_files = listed_files(capsys.readouterr().out)
    assert RecordingApi.calls == []

    commit = script.main(
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
    assert commit.oid == "0" * 40
    names = [call[0] for call in RecordingApi.calls]
    assert names.count("create_repo") == 1 and names.count("create_commit") == 1 and "upload_folder" not in names
    create_repo = next(call[1] for call in RecordingApi.calls if call[0] == "create_repo")
    assert create_repo["repo_id"] == "me/mimco-tiny" and create_repo["private"] is True
    # the token that was checked against the files is the one the requests use
    assert create_repo["token"] == FAKE_TOKEN
    commit_call = next(call[1] for call in RecordingApi.calls if call[0] == "create_commit")
    assert commit_call["commit_message"] == "First upload" and commit_call["token"] == FAKE_TOKEN
    assert sorted(operation.path_in_repo for operation in commit_call["operations"]) == sorted(dry_files)

    captured = capsys.readouterr()
    assert f"Committed {len(dry_files)} files to me/mimco-tiny: {commit.commit_url}" in captured.out
    assert FAKE_TOKEN not in captured.out + captured.err + caplog.text
    assert not any(
        FAKE_TOKEN in path.read_bytes().decode("latin-1") for path in checkpoint.rglob("*") if path.is_file()
    )


def test_push_writes_the_generated_card_before_the_commit(checkpoint, monkeypatch, capsys):
    (checkpoint / "README.md").unlink()
    monkeypatch.setattr(upload, "HfApi", RecordingApi)
    RecordingApi.calls = []
    results = {"dataset": "uoft-cs/cifar10", "results": {"knn_top1": 55.5}}
    upload.push_to_hub(checkpoint, "me/mimco-tiny", token=FAKE_TOKEN, results=results)
    card = ModelCard.load(checkpoint / "README.md")
    assert [result.metric_value for result in card.data.eval_results] == [55.5]
    commit_call = next(call[1] for call in RecordingApi.calls if call[0] == "create_commit")
    assert "README.md" in [operation.path_in_repo for operation in commit_call["operations"]]
    assert f"Wrote the model card {checkpoint / 'README.md'}" in capsys.readouterr().out


def test_an_explicit_token_is_checked_against_the_files(checkpoint, monkeypatch, no_network):
    """The training loop passes `--hub_token`: that token, not HF_TOKEN's, must be the one looked for."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    other_token = "not-shaped-like-a-token-1234"
    (checkpoint / "preprocessor_config.json").write_text(json.dumps({"note": other_token}))
    with pytest.raises(ValueError, match="preprocessor_config.json contains") as error:
        upload.push_to_hub(checkpoint, "me/mimco-tiny", token=other_token)
    assert other_token not in str(error.value)
    with pytest.raises(ValueError, match="commit message"):
        upload.push_to_hub(checkpoint, "me/mimco-tiny", token=FAKE_TOKEN, commit_message=f"token {FAKE_TOKEN}")


def test_files_holding_a_token_are_refused(script, checkpoint, monkeypatch, no_network):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    with open(checkpoint / "README.md", "a") as card:
        card.write(f"\nlogin with {FAKE_TOKEN}\n")
    with pytest.raises(SystemExit, match="README.md") as error:
        script.main(["--checkpoint_dir", str(checkpoint), "--hub_model_id", "me/mimco-tiny", "--dry_run"])
    assert FAKE_TOKEN not in str(error.value)


def test_push_without_a_token_is_refused(script, checkpoint, monkeypatch, no_network):
    monkeypatch.setattr(upload, "get_token", lambda: None)
    with pytest.raises(SystemExit, match="HF_TOKEN"):
        script.main(["--checkpoint_dir", str(checkpoint), "--hub_model_id", "me/mimco-tiny"])

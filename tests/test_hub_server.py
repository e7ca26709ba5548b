"""Real uploads (not the dry run) through huggingface_hub, against the fake Hub of tests/helpers/fake_hub.py on
127.0.0.1: `mimco-push` as a subprocess with `HF_ENDPOINT`, and `upload.push_to_hub` (what the pre-training loop's
`--push_to_hub` calls) in this process. Nothing connects anywhere but 127.0.0.1."""

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers.fake_hub import FakeHub, assert_token_only_in_authorization, subprocess_env, use_in_process
from helpers.scripts import load_script
from huggingface_hub import ModelCard
from transformers import ViTImageProcessor
from transformers.dynamic_module_utils import get_relative_imports

from modeling_mimco import MimCoForPreTraining, MimCoModel
from modeling_mimco.hub import upload
from modeling_mimco.interop.model_folders import save_image_processor


ROOT = Path(__file__).resolve().parents[1]
FAKE_TOKEN = "hf_" + "Fk9" * 12
REPO_ID = "me/mimco-tiny"
SUBPROCESS_TIMEOUT_S = 180


def code_files_with_their_imports(files: dict[str, bytes], folder: Path) -> None:
    """Every uploaded module's relative imports are uploaded too (else `trust_remote_code` loading fails)."""
    for name in [name for name in files if name.endswith(".py")]:
        for module in get_relative_imports(str(folder / name)):
            assert f"{module}.py" in files, f"{name} imports {module}, which was not uploaded"


def run_against(fake: FakeHub, command: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Runs `command` as a subprocess that can reach only `fake` (and holds the fake token)."""
    return subprocess.run(
        command,
        env=subprocess_env(fake, FAKE_TOKEN, tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )


def expected_upload(folder: Path) -> set[str]:
    config = json.loads((folder / "config.json").read_text())
    auto_map_files = {reference.rsplit(".", 1)[0] + ".py" for reference in config["auto_map"].values()}
    assert {"configuration_mimco.py", "modeling_mimco.py"} <= auto_map_files
    code_files = {path.name for path in folder.glob("*.py")}
    weights = {path.name for path in folder.glob("*.safetensors")}
    assert auto_map_files <= code_files and weights
    return {"config.json", "preprocessor_config.json", "README.md"} | weights | code_files


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_mimco_config):
    """A tiny MimCoModel folder with its processor, no card, and files that must stay local."""
    folder = tmp_path / "mimco-tiny"
    MimCoModel(tiny_mimco_config(num_hidden_layers=1)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    (folder / "optimizer.pt").write_bytes(b"\x80\x04 optimizer state, not for upload")
    (folder / "logs").mkdir()
    (folder / "logs" / "events.txt").write_text("step 1\n")
    return folder


@pytest.mark.slow
def test_mimco_push_commits_the_checkpoint_through_the_hub_api(tmp_path, tiny_checkpoint):
    folder = tiny_checkpoint
    probe_results = tmp_path / "probe" / "linear_probe_results.json"
    probe_results.parent.mkdir()
    probe_results.write_text(
        json.dumps(
            {
                "dataset": "uoft-cs/cifar10",
                "train_split": "train",
                "eval_split": "test",
                "num_classes": 10,
                "models": [
                    {
                        "name": "mimco-tiny",
                        "model_name_or_path": str(folder),
                        "linear_probe_top1": 0.5,
                        "knn_top1": 0.25,
                    },
                    {"name": "random-init", "model_name_or_path": "random-init", "linear_probe_top1": 0.1},
                ],
            }
        )
    )
    with FakeHub(token=FAKE_TOKEN, max_requests=40, timeout_s=SUBPROCESS_TIMEOUT_S + 30) as fake:
        command = [sys.executable, "-m", "modeling_mimco.commands.push_to_hub", "--checkpoint_dir", str(folder)]
        command += ["--hub_model_id", REPO_ID, "--private", "--commit_message", "First upload"]
        command += ["--results_file", str(probe_results)]
        process = run_against(fake, command, tmp_path)
    output = process.stdout + process.stderr
    assert process.returncode == 0, output
    assert fake.unexpected == []

    calls = fake.calls()
    create, preupload, commit_call = (
        "POST /api/repos/create",
        f"POST /api/models/{REPO_ID}/preupload/main",
        f"POST /api/models/{REPO_ID}/commit/main",
    )
    assert calls.count(create) == 1 and calls.count(commit_call) == 1 and preupload in calls
    assert calls.index(create) < calls.index(preupload) < calls.index(commit_call)
    assert f"POST /{REPO_ID}.git/info/lfs/objects/batch" in calls  # the weights went the LFS way
    assert fake.repos[REPO_ID]["visibility"] == "private"

    assert len(fake.commits) == 1
    commit = fake.commits[0]
    assert commit.repo_id == REPO_ID and commit.summary == "First upload"
    # README.md was generated (and written into the folder) because the folder had none
    assert set(commit.files) == expected_upload(folder)
    assert {"optimizer.pt", "logs/events.txt"}.isdisjoint(commit.files)
    assert commit.lfs_paths == ["model.safetensors"]
    for name, content in commit.files.items():
        assert content == (folder / name).read_bytes(), f"{name} differs from the local file"
    code_files_with_their_imports(commit.files, folder)

    card = ModelCard(commit.files["README.md"].decode())
    assert card.data.library_name == "transformers"
    assert sorted(result.metric_value for result in card.data.eval_results) == [25.0, 50.0]
    assert {result.dataset_split for result in card.data.eval_results} == {"test"}

    assert FAKE_TOKEN not in output
    assert_token_only_in_authorization(fake, FAKE_TOKEN)
    assert f"Committed {len(commit.files)} files to {REPO_ID}: {fake.endpoint}/{REPO_ID}/commit/" in process.stdout
    assert "Left out (2 files, kept local): logs/ (1 file), optimizer.pt" in process.stdout


def test_mimco_push_with_a_rejected_token_fails_in_one_line(tiny_checkpoint, monkeypatch, capsys):
    wrong_token = "hf_" + "Wr0" * 12
    with FakeHub(token=FAKE_TOKEN, max_requests=20, timeout_s=30) as fake:
        use_in_process(fake, monkeypatch, token=wrong_token)
        with pytest.raises(SystemExit) as error:
            load_script("push_to_hub").main(["--checkpoint_dir", str(tiny_checkpoint), "--hub_model_id", REPO_ID])
    message = str(error.value)
    assert ": error: " in message and "\n" not in message
    assert "401" in message and "missing or wrong token" in message
    assert wrong_token not in message + capsys.readouterr().out
    # create-repo is refused (and huggingface_hub's follow-up look-up of the repo): nothing gets further
    assert fake.commits == [] and fake.calls()[0] == "POST /api/repos/create"
    assert not any("/preupload/" in call or "/commit/" in call for call in fake.calls())
    assert not (tiny_checkpoint / "README.md").exists()  # the card is only written once the token was accepted


def test_push_to_hub_uploads_a_pretraining_output_in_process(
    tmp_path, tiny_mimco_config, monkeypatch, capsys, one_thread
):
    """The stage-2 output folder as the pre-training loop leaves it, pushed with the loop's call."""
    output_dir = tmp_path / "student"
    config = tiny_mimco_config(num_hidden_layers=1)
    MimCoForPreTraining(config).save_pretrained(output_dir)
    save_image_processor(str(output_dir), config.image_size, config.image_mean, config.image_std)
    (output_dir / "train_results.json").write_text(json.dumps({"global_step": 2}))
    (output_dir / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (output_dir / "checkpoints" / "checkpoint-2" / "optimizer.bin").write_bytes(b"state")
    (output_dir / "checkpoints" / "checkpoint-2" / "model.safetensors").write_bytes(b"not the final weights")
    monkeypatch.delenv("HF_TOKEN", raising=False)  # the loop passes its --hub_token explicitly

    with FakeHub(token=FAKE_TOKEN, max_requests=40, timeout_s=60) as fake:
        use_in_process(fake, monkeypatch)
        commit = upload.push_to_hub(str(output_dir), "me/mimco-student", token=FAKE_TOKEN, private=False)
        first_output = capsys.readouterr().out
        # a second push to the repository, which now exists (409 from create-repo), is a second commit
        (output_dir / "train_results.json").write_text(json.dumps({"global_step": 4}))
        second = upload.push_to_hub(output_dir, "me/mimco-student", token=FAKE_TOKEN, commit_message="Step 4")
        second_output = capsys.readouterr().out

    assert fake.unexpected == []
    assert commit.commit_url == f"{fake.endpoint}/me/mimco-student/commit/{commit.oid}"
    assert commit.oid != second.oid and len(fake.commits) == 2
    assert fake.repos["me/mimco-student"]["visibility"] == "public"
    first, again = fake.commits
    assert set(first.files) == expected_upload(output_dir) and set(again.files) == set(first.files)
    assert first.summary == upload.DEFAULT_COMMIT_MESSAGE and again.summary == "Step 4"
    code_files_with_their_imports(first.files, output_dir)
    assert first.files["README.md"] == (output_dir / "README.md").read_bytes()  # generated once, then kept
    card = ModelCard(first.files["README.md"].decode())
    assert card.data.pipeline_tag == "image-feature-extraction" and card.data.eval_results is None

    assert "README.md (model card generated from config.json)" in first_output
    assert "Left out (3 files, kept local): checkpoints/ (2 files), train_results.json" in first_output
    assert commit.commit_url in first_output and second.commit_url in second_output
    assert "generated" not in second_output
    assert FAKE_TOKEN not in first_output + second_output
    assert_token_only_in_authorization(fake, FAKE_TOKEN)


def test_network_failures_are_oserrors_that_name_the_repo(tmp_path, tiny_checkpoint, monkeypatch):
    (tiny_checkpoint / "README.md").write_text("---\nlibrary_name: transformers\n---\n# card\n")
    with FakeHub(token=FAKE_TOKEN, timeout_s=30) as fake:
        use_in_process(fake, monkeypatch)
        with pytest.raises(OSError, match="401") as rejected:
            upload.push_to_hub(tiny_checkpoint, REPO_ID, token="hf_" + "Wr0" * 12)
    assert "Wr0Wr0" not in str(rejected.value)
    # the server is gone now: the connection is refused
    with pytest.raises(OSError, match=f"Upload of .* to {REPO_ID} at {fake.endpoint} failed"):
        upload.push_to_hub(tiny_checkpoint, REPO_ID, token=FAKE_TOKEN)


def test_the_fake_hub_is_bounded_in_requests_and_time():
    with FakeHub(max_requests=2, timeout_s=30) as fake:
        for _ in range(2):
            with pytest.raises(urllib.error.HTTPError) as error:
                urllib.request.urlopen(f"{fake.endpoint}/api/nothing", timeout=5)
            assert error.value.code == 404
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"{fake.endpoint}/api/nothing", timeout=5)
        assert error.value.code == 400
        deadline = time.monotonic() + 5
        while not fake.closed and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fake.closed
    assert fake.unexpected == ["GET /api/nothing"] * 2

    start = time.monotonic()
    fake = FakeHub(timeout_s=0.3).start()
    while not fake.closed and time.monotonic() - start < 5:
        time.sleep(0.02)
    assert fake.closed and time.monotonic() - start < 5
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{fake.endpoint}/api/nothing", timeout=2)


@pytest.mark.slow
def test_finetuning_push_to_hub_commits_once_through_the_checked_path(tmp_path, tiny_mimco_config):
    """`run_finetuning.py --push_to_hub` uploads the fine-tuned folder once, at the end, with the package's push
    (model card with the measured accuracy, code files, no token outside the header), not the Trainer's."""
    MimCoForPreTraining(tiny_mimco_config(num_hidden_layers=1)).save_pretrained(tmp_path / "pretrained")
    output_dir = tmp_path / "finetuned"
    command = [sys.executable, str(ROOT / "scripts" / "run_finetuning.py")]
    command += ["--model_name_or_path", str(tmp_path / "pretrained"), "--output_dir", str(output_dir)]
    command += ["--max_train_samples", "32", "--max_eval_samples", "16", "--max_steps", "2"]
    command += ["--per_device_train_batch_size", "8", "--save_strategy", "no", "--report_to", "none", "--use_cpu"]
    command += ["--dataloader_pin_memory", "false", "--push_to_hub", "--hub_model_id", "me/mimco-finetuned"]
    with FakeHub(token=FAKE_TOKEN, max_requests=40, timeout_s=SUBPROCESS_TIMEOUT_S + 30) as fake:
        process = run_against(fake, command, tmp_path)
    output = process.stdout + process.stderr
    assert process.returncode == 0, output[-3000:]
    assert fake.unexpected == []
    assert len(fake.commits) == 1
    commit = fake.commits[0]
    assert commit.repo_id == "me/mimco-finetuned"
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(commit.files)
    code_files_with_their_imports(commit.files, output_dir)
    card = ModelCard(commit.files["README.md"].decode())
    metrics = json.loads((output_dir / "eval_results.json").read_text())
    card_values = sorted(result.metric_value for result in card.data.eval_results)
    expected = sorted(100 * metrics[key] for key in ("eval_accuracy", "eval_top5_accuracy"))
    assert card_values == pytest.approx(expected, abs=0.05)
    assert FAKE_TOKEN not in output
    assert_token_only_in_authorization(fake, FAKE_TOKEN)

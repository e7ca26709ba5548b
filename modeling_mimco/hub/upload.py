"""The Hub upload of a MimCo checkpoint folder: the one push path of the package, behind `mimco-push`
(`commands/push_to_hub.py`) and the `--push_to_hub` of pre-training and fine-tuning.

This module owns which files of a folder are uploaded (`collect_upload_files`: config, weights, the remote-code
files, the image processor, the card), the check that none holds an access token (`check_no_secrets`), the dry-run
plan (`plan_upload`) and the one-commit upload (`push_to_hub`). A folder without a `README.md` gets its card from
`modeling_mimco.hub.model_card`. It imports the standard library, `huggingface_hub`, `transformers`' reader of relative
imports, and `model_card` of this package.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, get_token

from modeling_mimco.hub.model_card import build_model_card


# Files that are uploaded besides the weights and the code files that `auto_map` needs.
REQUIRED_FILES = {
    "config.json": "save the model with `save_pretrained` (after `import modeling_mimco`)",
    "preprocessor_config.json": "save the model with `save_pretrained`, which writes its image processor",
    "README.md": "write the model card with `mimco-card`",
}
DEFAULT_COMMIT_MESSAGE = "Upload MimCo model"
# A Hugging Face user access token, wherever it might have been pasted.
_HF_TOKEN_PATTERN = re.compile(rb"hf_[A-Za-z0-9]{30,}")


def _auto_map_modules(auto_map: dict[str, Any]) -> list[str]:
    """Module names (`modeling_mimco`...) that an `auto_map` points to inside the repository itself."""
    modules = []
    for reference in auto_map.values():
        references = reference if isinstance(reference, (list, tuple)) else [reference]
        for item in references:
            if not item or "--" in item:  # `None`, or code that lives in another repository
                continue
            module = item.rsplit(".", 1)[0]
            if module not in modules:
                modules.append(module)
    return modules


def _relative_imports(module_file: Path) -> list[str]:
    from transformers.dynamic_module_utils import get_relative_imports

    return sorted(get_relative_imports(str(module_file)))


def _remote_code_files(folder: Path, auto_map: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The code files that loading with `trust_remote_code` needs: the modules `auto_map` names and, transitively,
    the modules they import relatively. Returns those present in `folder` and a note for each one missing."""
    pending = [module.replace(".", "/") + ".py" for module in _auto_map_modules(auto_map)]
    code_files, missing = [], []
    while pending:
        name = pending.pop(0)
        if name in code_files:
            continue
        code_files.append(name)
        if not (folder / name).is_file():
            missing.append(f"{name} (code named by auto_map or imported by it)")
            continue
        pending += [module.replace(".", "/") + ".py" for module in _relative_imports(folder / name)]
    return [name for name in code_files if (folder / name).is_file()], missing


def collect_upload_files(checkpoint_dir: str | Path, pending: Collection[str] = ()) -> tuple[list[str], list[str]]:
    """The files of `checkpoint_dir` to upload, and those left out.

    Uploaded: `config.json` (which must hold an `auto_map`; an UperNet folder written before `mimco-segment` saved
    one may go without), the safetensors weights (and their shard index), the code files that `auto_map` names
    together with the modules they import relatively, `preprocessor_config.json` and `README.md`. Anything else in the folder (optimizer states, pickles, logs...) stays local. `pending` names
    required files that are not written yet but will be before the upload (a generated `README.md`). Raises
    `ValueError` listing everything that is missing.
    """
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such checkpoint folder.")
    present = {name for name in REQUIRED_FILES if (folder / name).is_file() or name in pending}
    missing = [f"{name} ({hint})" for name, hint in REQUIRED_FILES.items() if name not in present]
    files = [name for name in REQUIRED_FILES if name in present]

    weights = sorted(path.name for path in folder.glob("*.safetensors"))
    if not weights:
        missing.append("*.safetensors (the model weights; save with `save_pretrained`)")
    files += weights
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files.append(index.name)
        shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        missing += [f"{shard} (listed in {index.name})" for shard in sorted(shards) if shard not in weights]

    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{folder / 'config.json'}: not valid JSON ({error}).") from None
        auto_map = config.get("auto_map")
        if not auto_map and config.get("model_type") == "upernet":
            # an UperNet folder of an earlier `mimco-segment`, without remote code: it loads as transformers'
            # UperNet once `modeling_mimco` is imported (today's folders carry an `auto_map` and load anywhere)
            auto_map = {}
        elif not auto_map:
            missing.append(
                "`auto_map` in config.json (save the model after `import modeling_mimco`, which registers it for "
                "remote code)"
            )
        if auto_map:
            code_files, missing_code = _remote_code_files(folder, auto_map)
            files += code_files
            missing += missing_code

    if missing:
        raise ValueError(f"{folder} is not ready to upload; missing: " + "; ".join(missing) + ".")
    files = sorted(dict.fromkeys(files))
    left_out = sorted(
        str(path.relative_to(folder))
        for path in folder.rglob("*")
        if path.is_file() and str(path.relative_to(folder)) not in files
    )
    return files, left_out


def _holds_token(content: bytes, token: str | None) -> bool:
    return bool((token and token.encode() in content) or _HF_TOKEN_PATTERN.search(content))


def check_no_secrets(checkpoint_dir: str | Path, files: list[str], token: str | None = None) -> None:
    """Refuses an upload whose files contain a Hugging Face access token (`token` itself, or anything shaped like
    one). The error names the file, never the token. Files of `files` that do not exist (yet) are skipped."""
    folder = Path(checkpoint_dir)
    for name in files:
        path = folder / name
        if path.is_file() and _holds_token(path.read_bytes(), token):
            raise ValueError(f"{path} contains a Hugging Face access token; remove it before uploading.")


def _is_transfer_error(error: BaseException) -> bool:
    """An error of the HTTP client under huggingface_hub (httpx), or one that wraps such an error."""
    for item in (error, error.__cause__):
        if item is not None and type(item).__module__.split(".")[0].startswith("httpx"):
            return True
    return isinstance(error, RuntimeError) and str(error).startswith("Error while uploading")


@dataclass
class UploadPlan:
    """What `push_to_hub` would upload: the folder's files, those left out, and the model card that it generates
    (and writes as `README.md` just before the commit) when the folder has none."""

    folder: Path
    repo_id: str
    files: list[str]
    left_out: list[str]
    generated_card: ModelCard | None = field(default=None, repr=False)


def plan_upload(
    checkpoint_dir: str | Path,
    hub_model_id: str,
    *,
    token: str | None = None,
    results: dict[str, Any] | None = None,
) -> UploadPlan:
    """Checks a checkpoint folder for upload without writing or sending anything.

    Without a `README.md`, the model card is built (`build_model_card`, with `results` in the card's schema) and
    kept in the plan. The files of `collect_upload_files` and the card are checked for access tokens
    (`check_no_secrets`, with `token` and the token pattern). Raises `ValueError` naming what is missing or wrong.
    """
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such checkpoint folder.")
    card = None
    if not (folder / "README.md").is_file() and (folder / "config.json").is_file():
        card = build_model_card(folder, results, repo_id=hub_model_id)
    files, left_out = collect_upload_files(folder, pending=("README.md",) if card is not None else ())
    check_no_secrets(folder, files, token)
    if card is not None and _holds_token(str(card).encode(), token):
        raise ValueError(f"The model card generated for {folder} contains a Hugging Face access token.")
    return UploadPlan(folder, hub_model_id, files, left_out, card)


def _summarize_paths(paths: list[str]) -> str:
    """`a.pt, logs/ (3 files)`: a folder (checkpoints, logs) is one entry, not one per file."""
    entries: dict[str, int] = {}
    for path in paths:
        top, _, rest = path.partition("/")
        key = f"{top}/" if rest else top
        entries[key] = entries.get(key, 0) + 1
    return ", ".join(
        f"{key} ({count} file{'s' if count != 1 else ''})" if key.endswith("/") else key
        for key, count in entries.items()
    )


def _log_plan(plan: UploadPlan, private: bool, dry_run: bool, log: Callable[[str], None]) -> None:
    """Logs the files that `plan` uploads (or, for a dry run, would upload) and those it leaves out."""
    verb = "Would upload" if dry_run else "Uploading"
    visibility = "private" if private else "public"  # applies to a repository that does not exist yet
    log(f"{verb} {len(plan.files)} files from {plan.folder} to {plan.repo_id} ({visibility} if created):")
    for name in plan.files:
        note = " (model card generated from config.json)" if name == "README.md" and plan.generated_card else ""
        log(f"  {name}{note}")
    if plan.left_out:
        log(f"Left out ({len(plan.left_out)} files, kept local): {_summarize_paths(plan.left_out)}")


def _commit_plan(
    api: HfApi,
    plan: UploadPlan,
    *,
    token: str,
    private: bool,
    commit_message: str,
    revision: str | None,
    log: Callable[[str], None],
) -> CommitInfo:
    """Creates the repository if needed, writes the generated card, and commits the plan's files in one commit.
    A failed transfer raises an `OSError` whose message never holds the token."""
    folder, hub_model_id = plan.folder, plan.repo_id
    try:
        api.create_repo(repo_id=hub_model_id, repo_type="model", private=private, exist_ok=True, token=token)
        if plan.generated_card is not None:  # written once the Hub has accepted the token
            plan.generated_card.save(folder / "README.md")
            log(f"Wrote the model card {folder / 'README.md'}.")
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in plan.files]
        return api.create_commit(
            repo_id=hub_model_id,
            repo_type="model",
            operations=operations,
            commit_message=commit_message,
            revision=revision,
            token=token,
        )
    except OSError as error:  # huggingface_hub's HTTP errors: they name the URL and the server's message
        if token and token in str(error):  # a server that echoes the token must not make us print it
            raise OSError(str(error).replace(token, "<token>")) from None
        raise
    except Exception as error:
        # A connection that fails (httpx's transport errors) or an LFS upload that does (a RuntimeError) is no
        # OSError; give the commands their one-line message, and keep the cause for a traceback.
        if not _is_transfer_error(error):
            raise
        cause = error.__cause__ if isinstance(error, RuntimeError) and error.__cause__ else error
        raise OSError(
            f"Upload of {folder} to {hub_model_id} at {getattr(api, 'endpoint', 'the Hub')} failed: {error}"
            + (f" ({type(cause).__name__}: {cause})" if cause is not error else "")
        ) from error


def push_to_hub(
    checkpoint_dir: str | Path,
    hub_model_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    revision: str | None = None,
    results: dict[str, Any] | None = None,
    dry_run: bool = False,
    api: HfApi | None = None,
    log: Callable[[str], None] = print,
) -> CommitInfo | None:
    """Uploads a checkpoint folder to `hub_model_id` in one commit: the one upload path of the package (`mimco-push`
    and the `--push_to_hub` of pre-training and fine-tuning all call it).

    1. `plan_upload`: writes nothing yet; builds the model card when the folder has no `README.md` (from
       `config.json` and `results`, a dict in the card's schema, see `model_card.load_results`; `results` is not
       used when a card exists), collects the files (`collect_upload_files`) and refuses files that hold `token` or
       anything shaped like an access token.
    2. Logs (through `log`) the files to upload and those left out. With `dry_run`, stops there: returns `None`,
       nothing is written or sent.
    3. Creates the repository if needed (`private` applies to a new one), writes the generated card as
       `README.md`, and commits every file in one commit on `revision` (default: main); logs the commit URL.

    The token is `token`, else `HF_TOKEN` or the cached login (`hf auth login`); it is checked against the files,
    sent in the request headers only, and never logged. The Hub address is huggingface_hub's (`HF_ENDPOINT`).
    Returns the `CommitInfo`. Raises `ValueError` for a folder that is not ready or a missing token; network errors
    are huggingface_hub's (`OSError`s).
    """
    token = token or get_token()  # an empty `--hub_token` means "not given"
    if token is None and not dry_run:
        raise ValueError("No Hugging Face token: set HF_TOKEN or log in with `hf auth login`.")
    if _holds_token(commit_message.encode(), token):
        raise ValueError("The commit message contains a Hugging Face access token.")
    plan = plan_upload(checkpoint_dir, hub_model_id, token=token, results=results)
    _log_plan(plan, private, dry_run, log)
    if dry_run:
        log("Dry run: nothing was uploaded" + (" and no README.md written." if plan.generated_card else "."))
        return None
    api = api if api is not None else HfApi(token=token)
    commit = _commit_plan(
        api, plan, token=token, private=private, commit_message=commit_message, revision=revision, log=log
    )
    log(f"Committed {len(plan.files)} files to {hub_model_id}: {commit.commit_url}")
    return commit


__all__ = [
    "DEFAULT_COMMIT_MESSAGE",
    "UploadPlan",
    "check_no_secrets",
    "collect_upload_files",
    "plan_upload",
    "push_to_hub",
]

"""`distillkit push`: upload an exported student to a Hugging Face Hub model repository.

Only the export's own files go up: model.safetensors, config.json and README.md (the model card, whose
loading code gets the repository's id), never checkpoints or the run's other files. Everything goes
through huggingface_hub, which reads HF_TOKEN (or `hf auth login`'s token), HF_ENDPOINT, HF_HUB_OFFLINE
and the proxies itself. Before creating anything, one request without retries (`whoami`) checks the token
and the connection, so an offline machine, a missing or refused token or an unreachable Hub is one clear
error within a second or so (FIRST_CONTACT_S at most, when the network swallows packets).

This module loads no torch: a push that fails, fails fast.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .card import HUB_REPO_PLACEHOLDER
from .errors import DistillkitError, RunError, UsageError

PUSH_FILES = ("model.safetensors", "config.json", "README.md")  # = export.py's WEIGHTS_FILE, CONFIG_FILE, CARD_FILE
FIRST_CONTACT_S = 10.0  # the longest the first request may take before the push gives up
LOGIN = (
    "log in with `hf auth login`, set HF_TOKEN, or pass --token (a token with write access: "
    "https://huggingface.co/settings/tokens)"
)


@dataclass
class PushResult:
    repo_id: str  # owner/name, as the Hub spells it
    url: str  # the repository's page
    commit_url: str
    files: list[str]  # what was uploaded


def push(
    path: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> PushResult:
    """Upload the student export of a compress run (the run folder, its student/ folder or any safetensors
    export folder) to the Hub model repository `repo_id` ("ORG/NAME", or "NAME" in the token's own namespace).

    The repository is created when missing (private when `private`; an existing one keeps its visibility).
    `token` defaults to HF_TOKEN or the token `hf auth login` stored. Raises `UsageError` for a folder that
    is not a complete export, a bad repo id, HF_HUB_OFFLINE or a missing / refused token, and `RunError`
    when the Hub cannot be reached or refuses the upload."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    folder = export_to_push(path)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(f"--repo-id {repo_id!r} is not a Hub repository id ({e}); use ORG/NAME") from None
    if constants.HF_HUB_OFFLINE:
        raise UsageError("HF_HUB_OFFLINE is set, and a push needs the Hub: unset HF_HUB_OFFLINE, then push again")
    api = HfApi(token=token)
    with hub_errors("checking the Hugging Face token", repo_id, api.endpoint):
        within(FIRST_CONTACT_S, api.whoami, f"{api.endpoint} did not answer within {FIRST_CONTACT_S:.0f} s")
    with hub_errors(f"creating the Hub repository {repo_id}", repo_id, api.endpoint):
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="distillkit-push-") as staging:
        stage(folder, Path(staging), repo.repo_id)
        with hub_errors(f"uploading {folder} to {repo.repo_id}", repo.repo_id, api.endpoint):
            commit = api.upload_folder(
                repo_id=repo.repo_id,
                folder_path=staging,
                repo_type="model",
                commit_message=commit_message or _commit_message(folder),
            )
    return PushResult(repo_id=repo.repo_id, url=str(repo), commit_url=str(commit.commit_url), files=list(PUSH_FILES))


def export_to_push(path: str | Path) -> Path:
    """The export folder behind `path` (a run folder, an export folder or its model.safetensors), checked
    to hold all of model.safetensors, config.json (a readable timm config) and README.md."""
    folder = Path(path).expanduser()
    if folder.is_file():
        folder = folder.parent
    if (folder / "student" / "config.json").is_file():  # a run folder
        folder = folder / "student"
    if not folder.is_dir():
        raise UsageError(f"{folder} does not exist: pass a compress run folder or an exported student folder")
    missing = [name for name in PUSH_FILES if not (folder / name).is_file()]
    if missing:
        raise UsageError(
            f"{folder} is not a complete timm export ({', '.join(missing)} missing): push a compress run folder "
            "or its student/ folder, or write a complete one with `distillkit export RUN --out FOLDER` (ONNX and "
            "TorchScript exports are not pushed: timm cannot load them from the Hub)"
        )
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config["architecture"], config["pretrained_cfg"]["input_size"]
    except (ValueError, KeyError, TypeError):
        raise UsageError(
            f"{folder / 'config.json'} is damaged or not a timm config; export the student again"
        ) from None
    return folder


def stage(folder: Path, staging: Path, repo_id: str) -> None:
    """The files to upload, in `staging`: the weights and config.json (hard links where the file system
    allows, else copies) and the model card with `repo_id` in its loading code."""
    for name in PUSH_FILES[:2]:
        try:
            os.link(folder / name, staging / name)
        except OSError:
            shutil.copy2(folder / name, staging / name)
    card = (folder / "README.md").read_text(encoding="utf-8")
    card = card.replace(f"hf-hub:{HUB_REPO_PLACEHOLDER}", f"hf-hub:{repo_id}")
    (staging / "README.md").write_text(card, encoding="utf-8")


def within(seconds: float, call: Callable[[], Any], late: str) -> Any:
    """`call()`'s result or exception, or a `RunError(late)` once `seconds` have passed (the call goes on in
    a daemon thread, which does not keep the process alive)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise RunError(f"{late}: check the network (and HTTPS_PROXY / HF_ENDPOINT if you use them), then push again")
    if "error" in box:
        raise box["error"]
    return box.get("value")


@contextmanager
def hub_errors(doing: str, repo_id: str, endpoint: str) -> Iterator[None]:
    """huggingface_hub's and its HTTP client's errors as distillkit errors that say what to do."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    try:
        yield
    except DistillkitError:
        raise
    except LocalTokenNotFoundError:
        raise UsageError(f"{doing}: no token was found; {LOGIN}") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        said = " ".join(str(e).split())
        if status == 401:
            raise UsageError(f"{doing}: the Hub refused the token ({said}); {LOGIN}") from None
        if status == 403:
            owner = repo_id.split("/")[0] if "/" in repo_id else "your namespace"
            raise UsageError(
                f"{doing}: the token may not write to {owner} ({said}); use a token with write access to it"
            ) from None
        raise RunError(f"{doing}: the Hub answered {status} ({said}); try again later") from None
    except Exception as e:  # noqa: BLE001 - the HTTP client's own errors (no connection, DNS, proxy, TLS)
        raise RunError(
            f"{doing} failed ({type(e).__name__}: {e}): the Hugging Face Hub at {endpoint} could not be reached, or "
            "the connection broke off; check the network (and HTTPS_PROXY / HF_ENDPOINT if you use them), then push "
            "again"
        ) from None


def _commit_message(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    teacher = ((config.get("distillkit") or {}).get("teacher") or {}).get("name")
    return f"distillkit push: {config['architecture']}" + (f", distilled from {teacher}" if teacher else "")

"""Pretrained weights from the Hugging Face Hub, through timm and huggingface_hub, failing fast and clearly.

Every request goes through huggingface_hub's own client, so its cache (`HF_HOME`, `HF_HUB_CACHE`),
`HF_HUB_OFFLINE`, `HF_ENDPOINT` mirrors, `HF_TOKEN` and proxies (`HTTPS_PROXY`) apply, and downloads resume.
The client retries a failed download with back-off (about 30 s per file when the network is down), so
before fetching weights that are not cached yet we ask the Hub once, without retries (`check_reachable`):
an offline machine gets its answer in about a second, from the client's own error.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UsageError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's Hub repositories hold, in timm's order
PROBE_TIMEOUT_S = 10.0


class HubUnavailable(Exception):
    """The Hub cannot be used from here (offline mode, no network, a mirror down); `str()` says why."""


def hub_repo(timm_name: str) -> str | None:
    """The Hub repository timm downloads `timm_name`'s weights from (`hf-hub:<repo>`, or the pretrained
    config's `hf_hub_id`), None when they come from elsewhere or the name has no pretrained weights."""
    from timm.models import get_pretrained_cfg, parse_model_name

    source, name = parse_model_name(timm_name)
    if source == "hf-hub":
        return name.split("@")[0]
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # an unknown pretrained tag
        return None
    return getattr(cfg, "hf_hub_id", None) if cfg is not None else None


def cached_weights(repo_id: str) -> Path | None:
    """The weights file of `repo_id` in the local Hugging Face cache, if one is there."""
    from huggingface_hub import try_to_load_from_cache

    for filename in WEIGHT_FILES:
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def check_reachable(repo_id: str) -> None:
    """Return when `repo_id`'s weights are cached or the Hub answers one request for the repository (no
    retries); raise `HubUnavailable` saying why not, or `UsageError` when the Hub says the repository does
    not exist or needs a login."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    if cached_weights(repo_id) is not None:
        return
    if constants.HF_HUB_OFFLINE:
        raise HubUnavailable("HF_HUB_OFFLINE is set and they are not in the local Hugging Face cache")
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=PROBE_TIMEOUT_S)
    except GatedRepoError:
        raise UsageError(
            f"the Hub repository {repo_id} is gated: accept its terms on huggingface.co/{repo_id}, then log in "
            "(`hf auth login` or HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise UsageError(
            f"the Hub repository {repo_id} does not exist (or is private: log in with `hf auth login` or set "
            "HF_TOKEN); check the name"
        ) from None
    except (EntryNotFoundError, HfHubHTTPError):
        return  # the Hub answered: timm / hf_hub_download give the precise error, if any
    except OfflineModeIsEnabled:
        raise HubUnavailable("HF_HUB_OFFLINE is set and they are not in the local Hugging Face cache") from None
    except Exception as e:  # the client's network errors (no connection, DNS, proxy, timeout)
        raise HubUnavailable(f"{constants.ENDPOINT} cannot be reached ({e})") from None


def hub_weights(repo_id: str) -> Path:
    """The local path of `repo_id`'s weights file: the cached one, else downloaded into the Hugging Face
    cache. Raises `HubUnavailable` (fast) when they are not cached and the Hub cannot be reached."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    cached = cached_weights(repo_id)
    if cached is not None:
        return cached
    check_reachable(repo_id)
    for filename in WEIGHT_FILES:
        try:
            return Path(hf_hub_download(repo_id, filename))
        except EntryNotFoundError:
            continue
        except OSError as e:
            raise HubUnavailable(f"downloading {repo_id}/{filename} failed ({e})") from None
    raise UsageError(f"the Hub repository {repo_id} holds none of {', '.join(WEIGHT_FILES)}")


def create_pretrained(timm_name: str, what: str, manual_hint: str, **kwargs):
    """`timm.create_model(timm_name, pretrained=True, **kwargs)`, or a `UsageError` saying what to download
    and which flag to pass. `timm_name` may be `<model>.<tag>` or `hf-hub:<repo>`."""
    import timm

    repo = hub_repo(timm_name)
    if repo is not None:
        try:
            check_reachable(repo)
        except HubUnavailable as e:
            raise UsageError(
                f"{what}: the weights of {timm_name!r} come from the Hugging Face Hub ({repo}), and {e}. {manual_hint}"
            ) from None
    try:
        return timm.create_model(timm_name, pretrained=True, **kwargs)
    except RuntimeError as e:
        if "No pretrained weights exist" in str(e) or "Invalid pretrained tag" in str(e):
            base = timm_name.split(".")[0]
            raise UsageError(
                f"{what}: timm has no pretrained weights for {timm_name!r}; use a pretrained tag "
                f"(timm.list_pretrained('{base}*') lists them) or pass a weights file"
            ) from None
        raise
    except OSError as e:  # huggingface_hub's and urllib's download errors are OSErrors
        raise UsageError(f"{what}: could not download the weights of {timm_name!r} ({e}). {manual_hint}") from None

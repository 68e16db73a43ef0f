"""Downloading pretrained weights through timm, failing fast and clearly when offline."""

from __future__ import annotations

import os
import socket

import timm
from torch import nn

from ..errors import UsageError

HUB_HOST = "huggingface.co"


def network_available(host: str = HUB_HOST, timeout: float = 3.0, port: int = 443) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def create_pretrained(timm_name: str, what: str, manual_hint: str, **kwargs) -> nn.Module:
    """`timm.create_model(pretrained=True)`, or a `UsageError` saying what to download and pass.

    With `HF_HUB_OFFLINE=1` set, timm reads its local cache without touching the network.
    """
    offline_mode = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not offline_mode and not network_available():
        raise UsageError(
            f"{what}: the weights of timm model {timm_name!r} must be downloaded from {HUB_HOST}, "
            f"which cannot be reached from this machine. {manual_hint}"
        )
    try:
        return timm.create_model(timm_name, pretrained=True, **kwargs)
    except RuntimeError as e:
        if "No pretrained weights exist" in str(e):
            raise UsageError(
                f"{what}: timm has no pretrained weights for {timm_name!r}; add a pretrained tag "
                f"(e.g. timm:{timm_name}.<tag>, see timm.list_pretrained('{timm_name}*')) "
                "or pass --teacher-weights FILE"
            ) from None
        raise
    except OSError as e:  # huggingface_hub's offline / not-found errors are OSErrors
        raise UsageError(f"{what}: could not download weights for {timm_name!r} ({e}). {manual_hint}") from None

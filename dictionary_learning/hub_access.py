"""A fast check that the Hugging Face Hub answers, made before a hub id or dataset name is
opened, so that offline a command fails in a second or two with one clear line instead of
the libraries' retries. Honours ``HF_ENDPOINT``; cached per process. With ``HF_HUB_OFFLINE``
or ``HF_DATASETS_OFFLINE`` set nothing is probed (the libraries read their cache)."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

_CACHE: dict[str, bool] = {}

ADVICE = ("pass a local path instead (a model folder, a .jsonl/.txt file), use --data stdlib "
          "or --model demo, or connect to the network")


class HubUnreachable(ConnectionError):
    """The Hub cannot be reached; the message says what to do."""


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline_env() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def reachable(url: str | None = None, timeout: float = 2.0) -> bool:
    """True when a TCP connection to the Hub endpoint's host opens within ``timeout``."""
    url = url or endpoint()
    if url in _CACHE:
        return _CACHE[url]
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            ok = True
    except OSError:
        ok = False
    _CACHE[url] = ok
    return ok


def require_hub(what: str) -> None:
    """Raise :class:`HubUnreachable` at once when ``what`` would need an unreachable Hub."""
    if offline_env():
        return
    if not reachable():
        raise HubUnreachable(f"cannot open {what}: the Hugging Face hub ({endpoint()}) is "
                             f"unreachable; {ADVICE}")

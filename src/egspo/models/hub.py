"""Whether a hub model can be fetched, decided in about a second instead of after ~30 s of retries.

    reason = offline_reason()   # None when the hub looks reachable, else why not, in words

The hub counts as offline when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set, or when a TCP
connection to the hub endpoint (``huggingface_hub``'s ``ENDPOINT``, which follows ``HF_ENDPOINT``; the
proxy instead, when one is configured for it) does not open within :data:`CONNECT_TIMEOUT_S`. The
probe runs once per process and address. :func:`is_cached` says whether a model is in the local hub
cache, which ``from_pretrained`` uses offline.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import urllib.request
from urllib.parse import urlsplit

from huggingface_hub import constants, try_to_load_from_cache

CONNECT_TIMEOUT_S = 2.0
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = ("1", "ON", "YES", "TRUE")  # what huggingface_hub accepts as set


def offline_reason() -> str | None:
    """Why the hub cannot be used now (an offline variable, or no connection), in words; None if it can."""
    for variable in OFFLINE_VARIABLES:
        if os.environ.get(variable, "").strip().upper() in _TRUE:
            return f"{variable}={os.environ[variable]} is set; unset it to download"
    if constants.HF_HUB_OFFLINE:  # read by huggingface_hub when it was imported
        return "HF_HUB_OFFLINE was set when huggingface_hub was imported"
    host, port = probe_address(constants.ENDPOINT)
    problem = _connection_problem(host, port)
    if problem is not None:
        return f"{host}:{port} cannot be reached: {problem}; check the network, HF_ENDPOINT or the proxy"
    return None


def is_cached(repo_id: str) -> bool:
    """Whether the local hub cache holds this model's config.json (then it loads offline)."""
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def probe_address(endpoint: str) -> tuple[str, int]:
    """The (host, port) a request to ``endpoint`` connects to first: its proxy's when one applies."""
    parts = urlsplit(endpoint)
    host = parts.hostname or "huggingface.co"
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if proxy_parts.hostname:
            return proxy_parts.hostname, proxy_parts.port or (443 if proxy_parts.scheme == "https" else 80)
    return host, parts.port or (443 if parts.scheme == "https" else 80)


@functools.cache
def _connection_problem(host: str, port: int) -> str | None:
    # In a daemon thread: name resolution is not covered by the socket timeout and can hang longer.
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(str(exc) or type(exc).__name__)

    thread = threading.Thread(target=connect, name="egspo-hub-probe", daemon=True)
    thread.start()
    thread.join(CONNECT_TIMEOUT_S)
    return outcome[0] if outcome else f"no answer within {CONNECT_TIMEOUT_S:g} s"

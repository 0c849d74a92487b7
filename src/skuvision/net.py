"""A fast reachability check, so downloads are tried only where the network allows and never hang."""

from __future__ import annotations

import os
import socket
import threading
from functools import cache
from urllib.parse import urlparse


@cache
def host_reachable(host_or_url: str, timeout: float = 3.0) -> bool:
    """True when a TCP connection to the host's HTTPS port opens within `timeout` seconds."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("SKUVISION_OFFLINE") == "1":
        return False
    host = urlparse(host_or_url).hostname or host_or_url
    result: list[bool] = []

    def probe() -> None:  # name resolution ignores socket timeouts, hence the thread
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])

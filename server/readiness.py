"""Wait for a child process's HTTP endpoint to answer 200 (servers started by bench-serve and the tests)."""

from __future__ import annotations

import subprocess
import time

import httpx


class NotReadyError(RuntimeError):
    """The process exited, or its endpoint did not answer 200 in time."""


def wait_ready(url: str, process: subprocess.Popen, timeout: float, interval: float = 0.3) -> None:
    """Poll ``url`` until it answers 200; raise NotReadyError if ``process`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise NotReadyError(f"process exited with status {process.returncode} before {url} was ready")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    raise NotReadyError(f"{url} not ready after {timeout:.0f} s")

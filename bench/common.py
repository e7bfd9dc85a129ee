"""Helpers the benchmark scripts share. The scripts run as `python bench/<name>.py`, which puts
bench/ first on sys.path, so they import this module as `common`."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(
    url: str, proc: subprocess.Popen[bytes], log: Path | None = None, timeout_s: float = 180.0, poll_s: float = 0.3
) -> float:
    """Seconds until `url` answers 200; RuntimeError (with the tail of `log`) when `proc` exits or
    `timeout_s` passes first."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"server for {url} exited with {proc.returncode}\n{tail}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    raise RuntimeError(f"{url} not ready in {timeout_s:.0f} s" + (f"; see {log}" if log is not None else ""))

"""`deepseek-serve serve` (as `python -m deepseek_serve serve`) with the real default model, in a
subprocess on a free loopback port; shared by the test areas that need a real server process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TypeVar

import httpx

REPO = Path(__file__).resolve().parents[2]
_S = TypeVar("_S", bound="ServeProcess")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """The server in its own session (killed as a group), stderr kept in `<data_dir>/server.stderr`.

    The environment is this process's minus every DS_* setting, plus small-engine defaults and `env`.
    Entering waits until `ready_path` answers 200 (or the process dies, or `timeout_s` passes).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        args: tuple[str, ...] = (),
        ready_path: str = "/health/ready",
        timeout_s: float = 120.0,
        **env: str,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.stderr_path = data_dir / "server.stderr"
        self.args = args
        self.ready_path = ready_path
        self.timeout_s = timeout_s
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DS_") and k != "PROMETHEUS_MULTIPROC_DIR"}
        paths = (str(REPO / "src"), os.environ.get("PYTHONPATH", ""))
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        self.env.update(
            {
                "DS_DATA_DIR": str(data_dir),
                "DS_MAX_BATCH_SIZE": "4",
                "DS_CONTEXT_LENGTH": "2048",
                "DS_N_THREADS": "1",
                "DS_MODEL": "smollm2-135m-instruct",
            }
        )
        self.env.update(env)
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self: _S) -> _S:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        stderr = self.stderr_path.open("wb")
        command = [
            sys.executable,
            "-m",
            "deepseek_serve",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.args,
        ]
        self.proc = subprocess.Popen(
            command, env=self.env, cwd=self.data_dir, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
        )
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.stderr()[-3000:]}")
            try:
                if httpx.get(f"{self.url}{self.ready_path}", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.__exit__()
        raise RuntimeError(f"server not up in {self.timeout_s:.0f}s:\n{self.stderr()[-3000:]}")

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

"""Server subprocesses for tests and benchmarks: `ServerProcess` runs any command that serves HTTP on
a loopback port, `ServeProcess` runs `deepseek-serve serve` (as `python -m deepseek_serve serve`)
with the test model and small-engine settings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai

from tests.support.net import free_port

REPO = Path(__file__).resolve().parents[2]
_S = TypeVar("_S", bound="ServerProcess")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment minus every DS_* setting and the multiprocess-metrics folder, with
    the worktree's src/ first on PYTHONPATH, the test model, and `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DS_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    paths = (str(REPO / "src"), os.environ.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["DS_MODEL"] = "smollm2-135m-instruct"
    env.update(extra)
    return env


class ServerProcess:
    """A server command in its own session (signalled as a group), its output kept in `log_path`.

    `start()` (or entering) waits until `ready_url` answers 200, the process exits (RuntimeError with
    the log's tail) or `timeout_s` passes, and returns the seconds it waited. `stdout=False` discards
    stdout and keeps only stderr in the log.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        ready_url: str,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        timeout_s: float = 120.0,
        stdout: bool = True,
        poll_s: float = 0.3,
    ) -> None:
        self.command = list(command)
        self.ready_url = ready_url
        self.log_path = log_path
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.timeout_s = timeout_s
        self.keep_stdout = stdout
        self.poll_s = poll_s
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        started = time.monotonic()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command,
                env=self.env,
                cwd=self.cwd,
                stdout=log if self.keep_stdout else subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        deadline = started + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.command[0]} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.ready_url, timeout=5).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(self.poll_s)
        self.stop()
        raise RuntimeError(f"{self.command[0]} not ready in {self.timeout_s:.0f}s:\n{self.log()[-3000:]}")

    def __enter__(self: _S) -> _S:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        """Sends `signum` to the whole process group."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signum)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`; returns the exit status (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL to the group: no clean shutdown."""
        if self.running:
            self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class ServeProcess(ServerProcess):
    """`deepseek-serve serve --host 127.0.0.1 --port <port> *args` with `data_dir` as data folder and
    working directory; stderr kept in `<data_dir>/server.stderr`, stdout discarded.

    The environment is `clean_env()` plus small-engine defaults (batch 4, context 2048, one thread)
    and `env`. `port` defaults to a free one; passing a port of an earlier server restarts it on the
    same address.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        args: tuple[str, ...] = (),
        ready_path: str = "/health/ready",
        timeout_s: float = 120.0,
        port: int | None = None,
        **env: str,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.args = args
        self.ready_path = ready_path
        data_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "deepseek_serve", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        defaults = {"DS_MAX_BATCH_SIZE": "4", "DS_CONTEXT_LENGTH": "2048", "DS_N_THREADS": "1"}
        super().__init__(
            [*command, *args],
            ready_url=f"{self.url}{ready_path}",
            log_path=data_dir / "server.stderr",
            env=clean_env(**{"DS_DATA_DIR": str(data_dir), **defaults, **env}),
            cwd=data_dir,
            timeout_s=timeout_s,
            stdout=False,
        )

    @property
    def stderr_path(self) -> Path:
        return self.log_path

    def stderr(self) -> str:
        return self.log()

    def openai_client(self, api_key: str = "none", **options: Any) -> openai.OpenAI:
        """The official client on this server's /v1: no retries, a 120 s timeout unless `options` say."""
        options = {"max_retries": 0, "timeout": 120, **options}
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, **options)

    def restarted(self) -> ServeProcess:
        """A new, not yet started server with the same command, environment and address."""
        again = ServeProcess(
            self.data_dir, args=self.args, ready_path=self.ready_path, timeout_s=self.timeout_s, port=self.port
        )
        again.env = dict(self.env)
        return again

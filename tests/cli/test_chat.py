"""`deepseek-serve chat` at a real terminal (a pty): keys typed while a reply streams are not
echoed into it and do not leak into the next message."""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_typing_during_a_reply_is_not_echoed_into_it(tmp_path: Path) -> None:
    pty = pytest.importorskip("pty")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DS_")}
    env.update(
        {
            "DS_DATA_DIR": str(tmp_path),
            "DS_MODEL": "smollm2-135m-instruct",
            "DS_N_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p),
        }
    )
    pid, fd = pty.fork()
    if pid == 0:  # the child: the real CLI on the pty
        os.execve(sys.executable, [sys.executable, "-m", "deepseek_serve", "chat", "-n", "160", "-t", "0"], env)
    out = bytearray()

    def read_until(marker: bytes, start: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            at = out.find(marker, start)
            if at != -1:
                return at
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    out.extend(os.read(fd, 4096))
                except OSError:
                    break
        raise AssertionError(f"{marker!r} not seen in {bytes(out)[-500:]!r}")

    try:
        read_until(b"> ", read_until(b"ready", 0, 120), 30)
        os.write(fd, b"Tell me a story about a dragon.\r")
        line_end = read_until(b"dragon.\r\n", 0, 30) + len(b"dragon.\r\n")
        # the reply has started streaming: type over it
        deadline = time.monotonic() + 60
        while len(out) <= line_end + 3 and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.1)[0]:
                out.extend(os.read(fd, 4096))
        os.write(fd, b"zzzq")
        next_prompt = read_until(b"\n> ", line_end, 120)
        reply = bytes(out[line_end:next_prompt])
        assert len(reply.strip()) > 10 and b"zzzq" not in reply
        # what was typed meanwhile was discarded: this message is read as sent
        os.write(fd, b"/exit\r")
        deadline = time.monotonic() + 30
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            assert time.monotonic() < deadline, f"chat did not exit on /exit: {bytes(out)[-300:]!r}"
            if select.select([fd], [], [], 0.1)[0]:
                with contextlib.suppress(OSError):
                    out.extend(os.read(fd, 4096))
        pid = 0
    finally:
        if pid:
            try:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(fd)

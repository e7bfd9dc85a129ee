"""The usage spool: append-only JSON-lines files holding records the database could not take.

Every append is flushed and fsync'd before it returns, so a spooled record survives a crash of
the process or the machine. An exclusive `flock` guards appends and claims, so the worker
processes of one host can share one spool path.

Replay is claim, read, insert, delete: `claim()` atomically renames the spool to a
`<name>.<pid>.<ns>.replay` file (new appends start a fresh spool) and returns every claimed file,
including ones left by a replay that failed or a process that died. A file is deleted only after
its records were written; since inserts are idempotent (unique request_id), reading the same file
twice, even from two processes, inserts nothing twice.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class Spool:
    def __init__(self, path: Path) -> None:
        self.path = path

    @contextmanager
    def _locked(self) -> Iterator[int]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # releases the lock

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Append records durably (one JSON object per line, fsync'd before returning)."""
        if not records:
            return
        data = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records)
        with self._locked():
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, data.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)

    def _claimed_files(self) -> list[Path]:
        return sorted(self.path.parent.glob(self.path.name + ".*.replay"))

    def claim(self) -> list[Path]:
        """Move the current spool aside for replay; return all files waiting for replay, oldest first."""
        with self._locked():
            if self.path.exists() and self.path.stat().st_size > 0:
                target = self.path.with_name(f"{self.path.name}.{os.getpid()}.{time.time_ns()}.replay")
                os.rename(self.path, target)
            return self._claimed_files()

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        """Records of one file; a torn last line (crash mid-append) is skipped with a warning."""
        records: list[dict[str, Any]] = []
        try:
            raw = path.read_bytes()
        except FileNotFoundError:  # another process replayed it already
            return records
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                logger.warning("usage spool %s: skipping unreadable line %d", path, n)
        return records

    @staticmethod
    def discard(path: Path) -> None:
        """Delete a replayed file."""
        path.unlink(missing_ok=True)

    def size(self) -> int:
        """Records waiting on disk: the spool plus claimed files not yet replayed."""
        total = 0
        for path in [self.path, *self._claimed_files()]:
            try:
                with path.open("rb") as f:
                    total += sum(1 for line in f if line.strip())
            except FileNotFoundError:
                continue
        return total

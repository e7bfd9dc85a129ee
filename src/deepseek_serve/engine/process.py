"""ProcessEngine: the scheduler core in its own process, behind the API process.

In `AsyncEngine` the scheduler loop runs in a thread of the API process and shares its GIL with the
event loop that frames SSE: each slows the other. `ProcessEngine` runs `LLMEngine` in a child process
started with multiprocessing's spawn context (CUDA needs spawn) and talks to it over one duplex pipe:

- API -> engine: ("add", Sequence), ("abort", request_id), ("clear", token), ("stop",).
- engine -> API: ("ready", _Ready) or ("failed", text) once after loading; ("added", request_id,
  error or None) for each add; ("out", outputs) with each step's outputs, the list of
  (request_id, delta, scheduled) that `AsyncEngine._deliver` takes; ("stats", EngineStats, prefix
  summary when it changed, else None) at most every `_STATS_INTERVAL_S` while busy (the summary at
  most every `_SUMMARY_INTERVAL_S`) and once on going idle;
  ("cleared", token) once a prefix-cache clear is done.

Requests are validated on the API side by the child's `RequestChecker` (pickled into the ready
message, tokenizer included), so a bad request never makes a round trip. `stats()` and
`prefix_cache_summary()` read the last snapshot the child sent. If the child dies, every open
stream ends with an error delta and the engine stops accepting (readiness fails).

Several API workers over one engine (`deepseek-serve serve --workers N` with the engine process on):
the serve supervisor starts the engine process through `EngineHost`, which also listens on a Unix
socket in a private folder (mode 0700, connections authenticated by a random key). Each worker's
`ProcessEngine.connect` gets the same ready message over its own connection and speaks the same
protocol; the engine process routes each step's outputs to the connection that added the request, and
ends a worker's requests when its connection closes. The supervisor's pipe is the control connection:
when it closes (the supervisor is gone) the engine process exits. One worker at a time (the oldest
connection) exports the engine's metrics, so that several workers do not add them up.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import itertools
import logging
import logging.config
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, Listener
from typing import TYPE_CHECKING, Any

from deepseek_serve.engine import prefix_summary
from deepseek_serve.engine.async_engine import AsyncEngine, RequestStream
from deepseek_serve.engine.chat_template import ChatTemplate
from deepseek_serve.engine.errors import EngineError, EngineStoppedError, QueueFullError
from deepseek_serve.engine.llm_engine import LLMEngine, Output, RequestChecker
from deepseek_serve.engine.types import (
    EngineState,
    EngineStats,
    GenerationRequest,
    ModelInfo,
    SamplingParams,
    StreamDelta,
)

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from deepseek_serve.config import Settings

logger = logging.getLogger(__name__)

_STATS_INTERVAL_S = 0.2  # the most often a busy child sends a stats snapshot
# the most often a busy child recomputes the prefix-cache summary (hashing up to 1,024 blocks takes a
# few ms of the step loop; gateways read it once per DS_GATEWAY_HEALTH_INTERVAL_S, 1 s by default)
_SUMMARY_INTERVAL_S = 1.0
_IDLE_WAIT_S = 0.5  # an idle child blocks this long on the pipe between checks
_LOAD_TIMEOUT_S = 3600.0  # model download + load + warm-up on the device
_CONNECT_TIMEOUT_S = 60.0  # a worker's wait for the ready message of a running engine process
# each read / write of an API worker's authentication handshake times out after this long, and at most this
# many handshakes run at once: a connection that stalls holds one handshake thread, never the accept loop
_HANDSHAKE_TIMEOUT_S = 10.0
_MAX_HANDSHAKES = 16
# where `serve` tells its workers the engine process's socket and key (hex)
ENGINE_SOCKET_ENV = "DS_ENGINE_SOCKET"
ENGINE_AUTHKEY_ENV = "DS_ENGINE_AUTHKEY"


def use_engine_process(settings: Settings) -> bool:
    """Whether `DS_ENGINE_PROCESS` puts the engine in its own process: "on"/"off" as said; "auto" =
    on for the torch runner on CUDA, off otherwise. With `DS_RUNNER=auto` the runner follows the
    model's format: a pack is GGUF (llama.cpp); otherwise the model is resolved (downloaded if needed,
    as loading would do next) to find out."""
    if settings.engine_process != "auto":
        return settings.engine_process == "on"
    if settings.runner == "llamacpp" or settings.device == "cpu":
        return False
    from deepseek_serve.models.resolve import parse_model_spec, resolve_model

    if settings.runner == "auto" and parse_model_spec(settings.model).pack:
        return False
    try:
        import torch
    except ImportError:
        return False
    if not torch.cuda.is_available():
        return False
    if settings.runner == "torch":
        return True
    from deepseek_serve.engine.runners import choose_runner

    model = resolve_model(
        settings.model,
        cache_dir=settings.models_dir,
        source=settings.model_source,
        revision=settings.model_revision,
        served_name=settings.served_model_name,
        index_url=settings.pack_index_url,
    )
    return choose_runner(settings, model) == "torch"


@dataclass(frozen=True)
class _Ready:
    """What the API side needs of the loaded model."""

    info: ModelInfo
    default_system_prompt: str | None
    checker: RequestChecker
    stats: EngineStats
    summary: str


@dataclass(frozen=True)
class _Listen:
    """Where the engine process takes API worker connections (`EngineHost`)."""

    address: str
    authkey: bytes


def _error_fields(exc: BaseException) -> tuple[str, dict[str, Any]]:
    """An add's failure as (kind, constructor fields), rebuilt by `_rebuild_error`."""
    if isinstance(exc, QueueFullError):
        return "queue_full", {"queue_size": exc.queue_size, "retry_after_s": exc.retry_after_s}
    return "internal", {"message": f"{type(exc).__name__}: {exc}"}


def _rebuild_error(kind: str, fields: dict[str, Any]) -> Exception:
    if kind == "queue_full":
        return QueueFullError(**fields)
    return EngineError(fields["message"])


# --- the child ---------------------------------------------------------------------------------------------
def _child_main(
    conn: Connection, settings: Settings, log_config: dict[str, Any] | None, listen: _Listen | None = None
) -> None:
    """The engine process: load the model, report ready (or the error), then serve the pipe (and with
    `listen`, API worker connections on a Unix socket).

    It ignores SIGINT and SIGTERM (a terminal's Ctrl-C and a `kill` of the process group reach it
    too): the API process drains and then stops it, and it exits on its own when the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if log_config is not None:
        logging.config.dictConfig(log_config)
    else:
        logging.basicConfig(level=settings.log_level.upper())
    from deepseek_serve.engine.loader import load_model

    listener: Listener | None = None
    try:
        loaded = load_model(settings)
        core = loaded.core
        ready = _Ready(
            info=loaded.info,
            default_system_prompt=loaded.default_system_prompt,
            checker=core.checker,
            stats=core.stats(),
            summary=prefix_summary.encode(prefix_summary.summarize(core.runner.cached_prefixes())),
        )
        try:
            message = pickle.dumps(("ready", ready))
        except Exception as exc:
            raise RuntimeError(
                f"the {loaded.info.runner} runner's tokenizer cannot be sent to the API process ({exc}); "
                "set DS_ENGINE_PROCESS=off"
            ) from exc
        if listen is not None:
            # no authkey here: `_accept` authenticates each connection in a thread of its own, with timeouts
            listener = Listener(listen.address, family="AF_UNIX", backlog=64)
    except BaseException as exc:
        logger.exception("the engine process could not load the model")
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        conn.close()
        return
    conn.send_bytes(message)
    loop = _ChildLoop(conn, core, ready.summary, shared=listener is not None)
    if listener is not None and listen is not None:
        loop.listen(listener, listen.authkey, message)
    try:
        loop.run()
    except OSError:  # a send to an API process that is gone (broken pipe)
        logger.info("the API process closed the pipe: the engine process exits")
    finally:
        if listener is not None:
            listener.close()
        core.close()
        conn.close()


class _ChildLoop:
    """The child's main thread: commands, steps, outputs and stats; no locks.

    `shared`: the first connection is the serve supervisor's control pipe (it adds nothing; its EOF or
    "stop" ends the loop) and API workers join over the socket (`listen`); each output goes to the
    connection that added its request. Otherwise the one connection is the API process's."""

    def __init__(self, conn: Connection, core: LLMEngine, summary: str, shared: bool = False) -> None:
        self.control = conn
        self.core = core
        self.shared = shared
        self.conns: list[Connection] = [conn]
        self.owner: dict[str, Connection] = {}  # shared: each live request's connection
        self.joined: queue.SimpleQueue[Connection] = queue.SimpleQueue()
        self.wake: int | None = None  # read end of the accept thread's wake-up pipe
        self.dead: list[Connection] = []  # worker connections a send failed on
        self.stopped = False
        self.clears: list[tuple[Connection, int, threading.Event]] = []
        self.summary = summary
        self.summary_of: list[Any] = []

    def listen(self, listener: Listener, authkey: bytes, ready: bytes) -> None:
        """Accept API workers in a thread: each that authenticates gets `ready`, then joins the loop's
        connections."""
        wake, wake_w = os.pipe()
        self.wake = wake
        threading.Thread(
            target=_accept, args=(listener, authkey, ready, self.joined, wake_w), name="engine-accept", daemon=True
        ).start()

    def run(self) -> None:
        core = self.core
        busy = False
        next_stats = next_summary = 0.0
        while not self.stopped:
            if self.dead:
                self.drop_dead()
            if not core.has_work():
                if busy:
                    busy = False
                    self.send_stats(with_summary=True)
                self.drain(_IDLE_WAIT_S)
                continue
            if not busy:
                busy = True
                self.gather_burst()
                if self.stopped:
                    break
            try:
                outputs = core.step()
            except Exception:
                logger.exception("engine step failed")
                outputs = core.fail_all("internal engine error")
            if outputs:
                self.send_outputs(outputs)
            if self.clears:
                self.answer_clears()
            now = time.monotonic()
            if now >= next_stats:
                next_stats = now + _STATS_INTERVAL_S
                with_summary = now >= next_summary
                if with_summary:
                    next_summary = now + _SUMMARY_INTERVAL_S
                self.send_stats(with_summary)
            self.drain(0.0)

    # --- connections -------------------------------------------------------------------------------
    def send(self, conn: Connection, message: tuple[Any, ...]) -> None:
        """Send on `conn`; a failure on the control pipe ends the process (OSError), on a worker's
        connection drops that worker."""
        try:
            conn.send(message)
        except OSError:
            if conn is self.control:
                raise
            if conn not in self.dead:
                self.dead.append(conn)

    def send_outputs(self, outputs: list[Output]) -> None:
        if not self.shared:
            self.send(self.control, ("out", outputs))
            return
        routed: dict[Connection, list[Output]] = {}
        owner = self.owner
        for out in outputs:
            conn = owner.get(out[0])
            if conn is None:  # its worker is gone: the request was aborted
                continue
            routed.setdefault(conn, []).append(out)
            if out[1] is not None and out[1].finished:
                del owner[out[0]]
        for conn, part in routed.items():
            self.send(conn, ("out", part))

    def workers(self) -> list[Connection]:
        return self.conns[1:] if self.shared else self.conns

    def reporter(self) -> Connection | None:
        """The connection whose worker exports the engine's metrics: the oldest."""
        workers = self.workers()
        return workers[0] if workers else None

    def take_joined(self) -> None:
        assert self.wake is not None
        os.read(self.wake, 4096)
        while not self.joined.empty():
            conn = self.joined.get()
            self.conns.append(conn)
            # the ready message's snapshot was taken at load: the current one, with the summary
            self.send(conn, ("stats", self.core.stats(), self.summary, conn is self.reporter()))
            logger.info("API workers connected: %d", len(self.workers()))  # a line per worker that joins

    def drop(self, conn: Connection) -> None:
        """A worker's connection closed: end its requests, hand metrics to the next worker."""
        if conn not in self.conns:
            return
        was_reporter = conn is self.reporter()
        self.conns.remove(conn)
        mine = [rid for rid, owner in self.owner.items() if owner is conn]
        for request_id in mine:
            del self.owner[request_id]
            self.core.abort(request_id)
        conn.close()
        logger.info("an API worker disconnected (%d requests aborted): %d connected", len(mine), len(self.workers()))
        if was_reporter:
            self.send_stats(with_summary=False)

    def drop_dead(self) -> None:
        dead, self.dead = self.dead, []
        for conn in dead:
            self.drop(conn)

    def drain(self, timeout: float) -> None:
        """Handle every command waiting on the connections, after waiting up to `timeout` for the
        first. EOF of the control pipe (the API process or the supervisor is gone) stops the loop."""
        waiting: list[Any] = [*self.conns, self.wake] if self.wake is not None else self.conns
        try:
            ready = multiprocessing.connection.wait(waiting, timeout)
        except OSError:
            ready = list(self.conns)
        for source in ready:
            if isinstance(source, Connection):
                self.read(source)
            else:  # the wake-up pipe's read end
                self.take_joined()

    def read(self, conn: Connection) -> None:
        try:
            while not self.stopped:
                self.handle(conn, conn.recv())
                if not conn.poll():
                    return
        except (EOFError, OSError):
            if conn is self.control:
                logger.info("the API process closed the pipe: the engine process exits")
                self.stopped = True
            else:
                self.drop(conn)

    def handle(self, conn: Connection, message: tuple[Any, ...]) -> None:
        kind = message[0]
        core = self.core
        if kind == "add":
            seq = message[1]
            error: tuple[str, dict[str, Any]] | None = None
            if self.shared and seq.request_id in self.owner:
                error = ("internal", {"message": f"request id {seq.request_id} is already running"})
            else:
                try:
                    core.add_sequence(seq)
                    if self.shared:
                        self.owner[seq.request_id] = conn
                except Exception as exc:
                    error = _error_fields(exc)
            self.send(conn, ("added", seq.request_id, error))
        elif kind == "abort":
            if not self.shared or self.owner.get(message[1]) is conn:  # a worker aborts only its own
                core.abort(message[1])
        elif kind == "clear":
            self.clears.append((conn, message[1], core.request_prefix_cache_clear()))
        elif kind == "stop":
            if conn is self.control:
                self.stopped = True
            else:  # a worker shutting down: its requests end, its connection closes (EOF there)
                self.drop(conn)

    def gather_burst(self) -> None:
        """`AsyncEngine._gather_burst`, reading the pipe for more adds between waits."""
        wait = self.core.config.burst_wait_s
        if wait <= 0:
            return
        deadline = time.monotonic() + 4 * wait
        seen = self.core.scheduler.num_waiting
        while not self.stopped and time.monotonic() < deadline:
            time.sleep(wait)
            self.drain(0.0)
            now = self.core.scheduler.num_waiting
            if now == seen:
                return
            seen = now

    def answer_clears(self) -> None:
        left = []
        for conn, token, done in self.clears:
            if not done.is_set():
                left.append((conn, token, done))
            elif conn in self.conns:
                self.send(conn, ("cleared", token))
        self.clears = left

    def send_stats(self, with_summary: bool) -> None:
        """The core's stats, and with `with_summary` the prefix-cache summary when it changed, to every
        API connection; the last field says whether that worker exports the engine's metrics."""
        changed: str | None = None
        entries = self.core.runner.cached_prefixes() if with_summary else self.summary_of
        same = len(entries) == len(self.summary_of) and all(
            a is b for a, b in zip(entries, self.summary_of, strict=False)
        )
        if not same:
            self.summary_of = entries
            summary = prefix_summary.encode(prefix_summary.summarize(entries))
            if summary != self.summary:
                self.summary = changed = summary
        stats = self.core.stats()
        reporter = self.reporter()
        for conn in self.workers():
            self.send(conn, ("stats", stats, changed, conn is reporter))


def _accept(listener: Listener, authkey: bytes, ready: bytes, joined: queue.SimpleQueue[Connection], wake: int) -> None:
    """The engine process's accept thread: each connection is authenticated in a thread of its own
    (`_handshake`, at most _MAX_HANDSHAKES at once, its reads and writes under _HANDSHAKE_TIMEOUT_S),
    so a client that connects and then says nothing holds up no other. Ends when the listener closes."""
    handshakes = threading.BoundedSemaphore(_MAX_HANDSHAKES)
    while True:
        try:
            conn = listener.accept()
        except OSError:
            return
        if not handshakes.acquire(blocking=False):
            logger.warning("%d engine socket handshakes in progress: a connection was refused", _MAX_HANDSHAKES)
            conn.close()
            continue
        threading.Thread(
            target=_handshake,
            args=(conn, authkey, ready, joined, wake, handshakes),
            name="engine-handshake",
            daemon=True,
        ).start()


def _io_timeout(conn: Connection, seconds: float) -> None:
    """A blocking read or write on `conn` fails (BlockingIOError) after `seconds`; 0: never."""
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:  # the options belong to the shared socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _handshake(
    conn: Connection,
    authkey: bytes,
    ready: bytes,
    joined: queue.SimpleQueue[Connection],
    wake: int,
    handshakes: threading.BoundedSemaphore,
) -> None:
    """Challenge and answer (multiprocessing's HMAC handshake, as `Listener(authkey=...)` does), then
    the ready message, then the connection joins the loop (woken through `wake`). Each read and write
    of the handshake times out after _HANDSHAKE_TIMEOUT_S (socket options, cleared once it is done)."""
    try:
        _io_timeout(conn, _HANDSHAKE_TIMEOUT_S)
        multiprocessing.connection.deliver_challenge(conn, authkey)
        multiprocessing.connection.answer_challenge(conn, authkey)
        conn.send_bytes(ready)
        _io_timeout(conn, 0.0)
    except (multiprocessing.AuthenticationError, OSError, EOFError) as exc:
        logger.warning("a connection to the engine socket failed to authenticate: %s", exc or type(exc).__name__)
        conn.close()
        return
    finally:
        handshakes.release()
    joined.put(conn)
    os.write(wake, b"\0")


# --- the API side ------------------------------------------------------------------------------------------
class ProcessEngine(AsyncEngine):
    """`AsyncEngine`'s surface over an engine process. Create with `from_settings`, then `start()`."""

    def __init__(self, process: BaseProcess | None, conn: Connection, ready: _Ready) -> None:
        """`process`: the engine process this API process started and owns; None for a connection to
        a shared one (`connect`)."""
        # AsyncEngine.__init__ wants a core in this process: its state is set here instead.
        self._process = process
        self._conn = conn
        self.model_info = ready.info
        info = ready.info
        self._template = (
            ChatTemplate(info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)
            if info.chat_template
            else None
        )
        self._default_system = ready.default_system_prompt
        self._checker = ready.checker
        self._stats = ready.stats
        self._summary = ready.summary
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: threading.Thread | None = None
        self._send_lock = threading.Lock()
        self._adds: dict[str, asyncio.Future[tuple[str, dict[str, Any]] | None]] = {}
        self._clears: dict[int, asyncio.Future[None]] = {}
        self._clear_ids = itertools.count()
        self._accepting = False
        self._stopping = False
        self._exit_message: str | None = None  # set once the engine process is gone
        self._reports_metrics = True  # this API process exports the engine's metrics
        atexit.register(self._close_pipe)

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: Settings, log_config: dict[str, Any] | None = None) -> ProcessEngine:
        """Start the engine process and wait until it has loaded the model; RuntimeError with its
        error when it cannot. `log_config`: a `logging.config.dictConfig` dict the child applies
        (the server's own), else a plain stderr handler at `settings.log_level`."""
        process, parent, ready = _start_engine_process(settings, log_config)
        logger.info("engine process %d serving model %s", process.pid, ready.info.id)
        return cls(process, parent, ready)

    @classmethod
    def connect(cls, address: str, authkey: bytes, timeout_s: float = _CONNECT_TIMEOUT_S) -> ProcessEngine:
        """Connect to a running engine process shared by several API workers (`EngineHost`);
        RuntimeError when it cannot be reached or does not answer in `timeout_s`."""
        try:
            conn = multiprocessing.connection.Client(address, family="AF_UNIX", authkey=authkey)
        except (OSError, multiprocessing.AuthenticationError) as exc:
            raise RuntimeError(f"cannot connect to the engine process at {address}: {exc}") from exc
        try:
            if not conn.poll(timeout_s):
                raise RuntimeError(f"the engine process at {address} did not answer in {timeout_s:.0f}s")
            message = conn.recv()
        except BaseException:
            conn.close()
            raise
        ready: _Ready = message[1]
        logger.info("connected to the engine process serving model %s", ready.info.id)
        return cls(None, conn, ready)

    # --- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._reader is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._accepting = self._exit_message is None
        self._reader = threading.Thread(target=self._read, name="engine-pipe", daemon=True)
        self._reader.start()

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Stop accepting; let open requests finish for up to `drain_timeout_s`; abort the rest; stop
        the engine process (killed if it does not exit in time). On a shared engine process: leave it
        (it ends this worker's requests and closes the connection) and let it run."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout_s
        while self._streams and self._exit_message is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for request_id in list(self._streams):
            self.abort(request_id)
        self._stopping = True
        self._send(("stop",))
        process = self._process
        if process is not None:
            await asyncio.to_thread(process.join, 30.0)
            if process.is_alive():
                logger.warning("the engine process did not stop in time: killing it")
                process.kill()
                await asyncio.to_thread(process.join, 5.0)
        elif self._reader is not None:  # the engine process closes its end: the reader sees EOF
            await asyncio.to_thread(self._reader.join, 5.0)
        self._close_pipe()
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, 5.0)
            self._reader = None

    @property
    def is_accepting(self) -> bool:
        return self._accepting and self._exit_message is None

    # --- requests ----------------------------------------------------------------------------------
    async def add_request(self, request: GenerationRequest) -> RequestStream:
        """Validate here, enqueue in the engine process; raises before any work (QueueFullError from
        the engine's queue bound, EngineStoppedError once the engine process is gone)."""
        if not self.is_accepting:
            raise EngineStoppedError(self._exit_message or "the engine is not accepting requests")
        seq = self._checker.make_sequence(request)  # raises InvalidRequest/ContextLength
        request_id = request.request_id
        stream = RequestStream(self, request_id, seq.num_prompt_tokens)
        reply = asyncio.get_running_loop().create_future()
        self._streams[request_id] = stream
        self._adds[request_id] = reply
        try:
            if not self._send(("add", seq)):
                raise EngineStoppedError(self._exit_message or "the engine process is gone")
            error = await reply
        except BaseException:
            self._streams.pop(request_id, None)
            self._adds.pop(request_id, None)
            if not reply.done():  # cancelled while the engine has it: take it back
                self._send(("abort", request_id))
            raise
        if error is not None:
            self._streams.pop(request_id, None)
            raise _rebuild_error(*error)
        return stream

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    async def clear_prefix_cache(self) -> None:
        token = next(self._clear_ids)
        done = asyncio.get_running_loop().create_future()
        self._clears[token] = done
        if self._send(("clear", token)):
            try:
                async with asyncio.timeout(10.0):
                    await done
            except TimeoutError:
                pass
        self._clears.pop(token, None)

    def tokenizer_bos_or_first(self) -> int:
        ids = self._checker.tokenizer.encode("Hi", add_special_tokens=True)
        return ids[0] if ids else 0

    # --- text helpers ------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._checker.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        ids = list(token_ids)
        self._checker.check_token_ids(ids)
        return self._checker.tokenizer.decode(ids)

    def check_request(self, params: SamplingParams, prompt_token_ids: Sequence[int], context: bool = True) -> int:
        return self._checker.check_request(params, list(prompt_token_ids), context)

    def stats(self) -> EngineStats:
        """The engine process' last snapshot (at most `_STATS_INTERVAL_S` old while busy)."""
        running = self._reader is not None and not self._stopping and self._exit_message is None
        return dataclasses.replace(self._stats, is_running=running)

    def prefix_cache_summary(self) -> str:
        return self._summary

    def metrics_snapshot(self) -> EngineState:
        """As `AsyncEngine`'s; on a shared engine process only one worker (`reports` True) exports it."""
        return EngineState(stats=self.stats(), accepting=self.is_accepting, reports=self._reports_metrics)

    # --- the pipe ----------------------------------------------------------------------------------
    def _send(self, message: tuple[Any, ...]) -> bool:
        """Send to the engine process; False when it is gone."""
        if self._exit_message is not None:
            return False
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):  # broken pipe, or closed on this side
            return False
        return True

    def _close_pipe(self) -> None:
        """Close this end: the engine process sees EOF and exits (also run at interpreter exit)."""
        self._conn.close()

    def _read(self) -> None:
        """The reader thread: hand each message to the event loop, then the end of the pipe."""
        assert self._loop is not None
        loop = self._loop
        conn = self._conn
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError, ValueError):
                break
            except Exception:
                # a message this side cannot read: nobody would drain the pipe, and the engine process
                # would block on its next send with every stream waiting; end it (or, when shared,
                # this connection) instead
                logger.exception("unreadable message from the engine process: stopping it")
                if self._process is not None:
                    self._process.kill()
                else:
                    self._close_pipe()
                break
            try:
                loop.call_soon_threadsafe(self._on_message, message)
            except RuntimeError:  # the event loop is closed
                return
        process = self._process
        if process is not None:
            # wait for the exit (the sentinel closes a moment before the exit status can be read); reap
            # it here only when shutdown() is not joining the process
            multiprocessing.connection.wait([process.sentinel], 5.0)
            for _ in range(100):
                if self._stopping or process.exitcode is not None:
                    break
                time.sleep(0.01)
        try:
            loop.call_soon_threadsafe(self._on_exit)
        except RuntimeError:
            pass

    def _on_message(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "out":
            self._deliver(message[1])
        elif kind == "stats":
            self._stats = message[1]
            if message[2] is not None:
                self._summary = message[2]
            self._reports_metrics = message[3]
        elif kind == "added":
            reply = self._adds.pop(message[1], None)
            if reply is not None and not reply.done():
                reply.set_result(message[2])
        elif kind == "cleared":
            done = self._clears.pop(message[1], None)
            if done is not None and not done.done():
                done.set_result(None)

    def _on_exit(self) -> None:
        """The engine process is gone: end every open stream with an error, refuse new requests."""
        if self._stopping:
            text = "the engine stopped"
        elif self._process is None:
            text = "the shared engine process closed the connection (it stopped or exited)"
        else:
            text = f"the engine process exited unexpectedly (exit code {self._process.exitcode})"
            logger.error("%s: %d open requests end with an error", text, len(self._streams))
        self._exit_message = text
        self._accepting = False
        for reply in self._adds.values():
            if not reply.done():
                reply.set_exception(EngineStoppedError(text))
        self._adds.clear()
        for done in self._clears.values():
            if not done.done():
                done.set_result(None)
        outputs: list[Output] = [
            (request_id, StreamDelta(text="", token_ids=(), finished=True, finish_reason="error", error=text), False)
            for request_id in list(self._streams)
        ]
        self._deliver(outputs)


def _start_engine_process(
    settings: Settings, log_config: dict[str, Any] | None, listen: _Listen | None = None
) -> tuple[BaseProcess, Connection, _Ready]:
    """Spawn the engine process and wait for its ready message: (process, this end of the pipe, ready).
    When it fails to load, the process is reaped (killed if it lingers) and RuntimeError says why."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=True)
    process = ctx.Process(target=_child_main, args=(child, settings, log_config, listen), name="engine", daemon=False)
    process.start()
    child.close()
    try:
        return process, parent, _wait_ready(process, parent)
    except BaseException:
        parent.close()
        process.join(10.0)
        if process.is_alive():
            process.kill()
            process.join()
        raise


def _wait_ready(process: BaseProcess, conn: Connection) -> _Ready:
    """The child's ready message; RuntimeError with its error text, or when it exits or times out."""
    deadline = time.monotonic() + _LOAD_TIMEOUT_S
    while not conn.poll(1.0):
        if not process.is_alive():
            raise RuntimeError(f"the engine process exited while loading the model (exit code {process.exitcode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the engine process did not load the model in {_LOAD_TIMEOUT_S:.0f}s")
    try:
        message = conn.recv()
    except EOFError:
        process.join(5.0)
        raise RuntimeError(
            f"the engine process exited while loading the model (exit code {process.exitcode})"
        ) from None
    if message[0] == "failed":
        raise RuntimeError(f"the engine process could not load the model: {message[1]}")
    ready: _Ready = message[1]
    return ready


class EngineHost:
    """The engine process of a `serve --workers N` supervisor, shared by its API workers.

    `start` loads the model in the engine process, which then also listens on a Unix socket in a
    private temporary folder; `environ()` tells workers (inherited `DS_ENGINE_SOCKET`,
    `DS_ENGINE_AUTHKEY`) where to `ProcessEngine.connect`. The supervisor keeps the control pipe:
    `stop()` ends the engine process, and so does the supervisor's exit (EOF)."""

    def __init__(self, process: BaseProcess, conn: Connection, address: str, authkey: bytes, folder: str) -> None:
        self.process = process
        self._conn = conn
        self.address = address
        self._authkey = authkey
        self._folder = folder
        self._stopping = False
        self.died = False  # the engine process exited before stop()

    @classmethod
    def start(cls, settings: Settings, log_config: dict[str, Any] | None = None) -> EngineHost:
        """Start the engine process and wait until it has loaded the model and listens; RuntimeError
        with its error when it cannot."""
        folder = tempfile.mkdtemp(prefix="deepseek-serve-engine-")  # mode 0700: only this user connects
        address = os.path.join(folder, "engine.sock")
        authkey = os.urandom(32)
        try:
            process, parent, ready = _start_engine_process(settings, log_config, _Listen(address, authkey))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        logger.info("engine process %d serving model %s to API workers at %s", process.pid, ready.info.id, address)
        return cls(process, parent, address, authkey, folder)

    def environ(self) -> dict[str, str]:
        """What API workers need to connect (they inherit it)."""
        return {ENGINE_SOCKET_ENV: self.address, ENGINE_AUTHKEY_ENV: self._authkey.hex()}

    def watch(self, on_exit: Callable[[], None]) -> None:
        """Call `on_exit` (from a thread) if the engine process exits before `stop()`."""

        def wait() -> None:
            multiprocessing.connection.wait([self.process.sentinel])
            if not self._stopping:
                self.died = True
                logger.error("the engine process exited unexpectedly (exit code %s)", self.process.exitcode)
                on_exit()

        threading.Thread(target=wait, name="engine-watch", daemon=True).start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """End the engine process (killed if it does not exit in `timeout_s`) and remove its socket."""
        self._stopping = True
        try:
            self._conn.send(("stop",))
        except OSError:
            pass
        self.process.join(timeout_s)
        if self.process.is_alive():
            logger.warning("the engine process did not stop in time: killing it")
            self.process.kill()
            self.process.join(5.0)
        self._conn.close()
        shutil.rmtree(self._folder, ignore_errors=True)


def connect_from_env() -> ProcessEngine | None:
    """A connection to the shared engine process `serve` started for its workers, when it did."""
    address = os.environ.get(ENGINE_SOCKET_ENV)
    if not address:
        return None
    try:
        authkey = bytes.fromhex(os.environ.get(ENGINE_AUTHKEY_ENV, ""))
    except ValueError as exc:
        raise RuntimeError(f"{ENGINE_AUTHKEY_ENV} is not a hex key") from exc
    return ProcessEngine.connect(address, authkey)

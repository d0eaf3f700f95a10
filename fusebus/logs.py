"""structlog, configured once at the entry point.

JSON lines when stderr is not a terminal (containers, files, CI), coloured console lines
when it is. Context bound with :func:`structlog.contextvars.bind_contextvars` (task_id,
stream, type, agent) is merged into every line.

With ``--log-format json`` every line on stderr is a JSON object, including what native libraries write
straight to file descriptor 2 (LiteRT's ``INFO: Created TensorFlow Lite XNNPACK delegate
for CPU.``, TensorFlow's C++ logging, a child process's output) and Python's own stderr
(warnings, tracebacks): fd 2 becomes a pipe read by a thread that wraps each line that is
not already a JSON object into a ``native.output`` event (see :func:`wrap_line`). Quieting
environment variables do not reach every library (``TF_CPP_MIN_LOG_LEVEL`` leaves the
XNNPACK line), and wrapping keeps what the line said. structlog itself writes straight to
the real stderr, so logging costs the same and does not depend on that thread.
``auto`` off a terminal renders JSON too but leaves fd 2 as it is: there the command's own
one-line errors (``fusebus coordinator: error: ...``) are still printed as plain text.

An uncaught exception becomes one ``process.crashed`` (or ``thread.crashed``) event with
its traceback, and what is in the pipe is written out at exit. A fatal signal (a segfault
in native code) kills the thread with the process, so ``faulthandler`` writes its dump to
the real stderr as plain text: a crash stays visible even though it breaks the format.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import faulthandler
import io
import json
import logging
import os
import re
import sys
import threading
import types
from collections.abc import Callable
from typing import TextIO, cast

import structlog

LEVELS = ("debug", "info", "warning", "error")

#: The event name of a line that something other than structlog wrote to stderr.
NATIVE_EVENT = "native.output"
#: The level given to a wrapped line that does not state its own.
UNSTATED_LEVEL = "warning"
#: A line longer than this is cut into pieces rather than held whole in memory.
MAX_LINE_BYTES = 64 * 1024

_RANK = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
# How native libraries state a line's level, one group naming it: LiteRT/TFLite ("INFO: ..."),
# glog and absl as TensorFlow uses them ("W1202 10:00:00.000 ..."), nats-server ("[WRN] ..."),
# and Python's warnings ("file.py:12: DeprecationWarning: ...").
_STATED_LEVELS: tuple[tuple[re.Pattern[str], dict[str, str]], ...] = (
    (
        re.compile(r"^(INFO|WARNING|ERROR|FATAL|DEBUG|VERBOSE):"),
        {
            "DEBUG": "debug",
            "VERBOSE": "debug",
            "INFO": "info",
            "WARNING": "warning",
            "ERROR": "error",
            "FATAL": "critical",
        },
    ),
    (re.compile(r"^([IWEF])\d{4} "), {"I": "info", "W": "warning", "E": "error", "F": "critical"}),
    (
        re.compile(r"\[(TRC|DBG|INF|WRN|ERR|FTL)\] "),
        {
            "TRC": "debug",
            "DBG": "debug",
            "INF": "info",
            "WRN": "warning",
            "ERR": "error",
            "FTL": "critical",
        },
    ),
    (re.compile(r"^\S.*:\d+: \w*(Warning): "), {"Warning": "warning"}),
)

_relay: NativeOutputRelay | None = None


def configure_logging(*, level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog for this process.

    Args:
        level: the lowest level shown: debug, info, warning or error.
        fmt: ``json``, ``console`` or ``auto`` (console on a terminal, JSON otherwise).
            With ``json``, what native code writes to stderr is wrapped too
            (see :func:`capture_native_output`).
    """
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    # Only when asked for by name: off a terminal, ``auto`` keeps the plain one-line errors
    # the command prints to stderr, which wrapping would turn into native.output events.
    relay = capture_native_output(level=level) if fmt == "json" else None
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info if as_json else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        # WriteLogger writes a line and its newline in one call (PrintLogger makes two)
        logger_factory=structlog.WriteLoggerFactory(
            file=relay.stderr if relay is not None else sys.stderr
        ),
        cache_logger_on_first_use=True,
    )
    if relay is not None:
        _log_uncaught_exceptions()


def stated_level(line: str) -> str | None:
    """The level a native library's log ``line`` states (``info``, ``warning``, ...), if any."""
    for pattern, names in _STATED_LEVELS:
        match = pattern.search(line)
        if match is not None:
            return names[match.group(1)]
    return None


def wrap_line(line: bytes, *, min_level: str = "debug") -> bytes | None:
    """One line written to stderr, as a JSON line: unchanged if it is a JSON object already,
    else a ``native.output`` event holding it, with the level it states (else
    :data:`UNSTATED_LEVEL`). ``None`` for an empty line, or one whose stated level is below
    ``min_level`` (a line that states none is always kept)."""
    text = line.decode("utf-8", errors="replace").rstrip("\r\n")
    if not text.strip():
        return None
    if text.startswith("{") and text.endswith("}"):
        try:
            if isinstance(json.loads(text), dict):
                return text.encode() + b"\n"
        except ValueError:
            pass
    level = stated_level(text)
    if level is not None and _RANK[level] < _RANK[min_level]:
        return None
    event = {
        "event": NATIVE_EVENT,
        "line": text,
        "level": level or UNSTATED_LEVEL,
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z"),
    }
    return json.dumps(event, ensure_ascii=False).encode() + b"\n"


class NativeOutputRelay:
    """File descriptor 2 as a pipe, read by a thread that writes each line to the real
    stderr as JSON (see :func:`wrap_line`).

    Args:
        min_level: lines stating a lower level are dropped, as structlog would drop them.
    """

    def __init__(self, *, min_level: str = "debug") -> None:
        self.min_level = min_level
        self.lines = 0  # lines wrapped or passed on
        sys.stderr.flush()
        self.real_fd = os.dup(2)  # not inheritable: children write into the pipe
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)  # inheritable, so children's stderr is wrapped too
        os.close(write_fd)
        self._read_fd = read_fd
        # Two threads write to the real stderr (structlog's callers and the relay), and a
        # write of a long line to a pipe is not atomic: each whole line is written under
        # this lock, so lines never interleave.
        self._write_lock = threading.Lock()
        #: The real stderr, for writers of whole JSON lines (structlog).
        self.stderr = cast(TextIO, _LockedStderr(self.write_real))
        # A fatal signal kills the relay thread too: its dump must go around the pipe.
        faulthandler.enable(file=self.real_fd, all_threads=True)
        self._thread = threading.Thread(target=self._relay, name="stderr-relay", daemon=True)
        self._thread.start()
        self._closed = False

    def __repr__(self) -> str:
        return f"NativeOutputRelay(lines={self.lines}, closed={self._closed})"

    def _relay(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self._read_fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if len(pending) > MAX_LINE_BYTES:  # an endless line is passed on in pieces
                lines.append(pending)
                pending = b""
            self._write(lines)
        self._write([pending])
        os.close(self._read_fd)

    def _write(self, lines: list[bytes]) -> None:
        pieces = (
            line[start : start + MAX_LINE_BYTES]
            for line in lines
            for start in range(0, max(len(line), 1), MAX_LINE_BYTES)
        )
        out = [w for w in (wrap_line(piece, min_level=self.min_level) for piece in pieces) if w]
        if not out:
            return
        self.lines += len(out)
        self.write_real(b"".join(out))

    def write_real(self, data: bytes) -> None:
        """Write ``data`` (whole lines) to the real stderr, in one piece among writers."""
        with self._write_lock, contextlib.suppress(OSError):  # stderr gone: nothing to tell
            while data:
                data = data[os.write(self.real_fd, data) :]

    def close(self, timeout_s: float = 2.0) -> None:
        """Point fd 2 back at the real stderr and write out what the pipe still holds.

        The thread ends when every writer has closed the pipe; a child process that still
        holds it keeps it open, so this waits at most ``timeout_s``.
        """
        if self._closed:
            return
        self._closed = True
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os.dup2(self.real_fd, 2)  # closes this process's write end of the pipe
        self._thread.join(timeout_s)


class _LockedStderr(io.TextIOBase):
    """A text stream whose every ``write`` goes out at once through ``write_real``."""

    def __init__(self, write_real: Callable[[bytes], None]) -> None:
        super().__init__()
        self._write_real = write_real

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._write_real(text.encode("utf-8", errors="replace"))
        return len(text)


def capture_native_output(*, level: str = "debug") -> NativeOutputRelay | None:
    """Wrap what is written to file descriptor 2 into JSON lines, for this process's life.

    Once per process (later calls return the same relay), and only when ``sys.stderr``
    writes to fd 2: when it does not (a test runner capturing output), nothing is changed
    and ``None`` is returned. The pipe is written out at exit.
    """
    global _relay
    if _relay is not None:
        return _relay
    try:
        if sys.stderr.fileno() != 2:
            return None
    except (AttributeError, OSError, ValueError):
        return None
    try:
        _relay = NativeOutputRelay(min_level=level)
    except OSError:
        return None  # no fd 2 to take over (a daemon started with it closed)
    atexit.register(_relay.close)
    return _relay


def _log_uncaught_exceptions() -> None:
    """Log an uncaught exception as one JSON event with its traceback, not as many lines."""
    log = structlog.get_logger("fusebus")

    def on_exception(
        kind: type[BaseException], exc: BaseException, tb: types.TracebackType | None
    ) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, exc, tb)
            return
        log.critical("process.crashed", exc_info=(kind, exc, tb))

    def on_thread_exception(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        log.critical(
            "thread.crashed",
            thread=args.thread.name if args.thread else None,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )

    sys.excepthook = on_exception
    threading.excepthook = on_thread_exception

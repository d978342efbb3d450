"""The supervisor's terminal: one line per event, a progress line that redraws in place on
a TTY, and logs/supervisor.log. Output trouble (EPIPE, EIO: `| head`, a closed terminal)
silences the console and never stops the run."""

from __future__ import annotations

import errno
import io
import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, TextIO

from supervisor.errors import UserError

# --------------------------------------------------------------------------- console


class LineFormatter(logging.Formatter):
    """`[trainsup] message`, with `warning: `/`error: ` after the tag for WARNING and up."""

    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        if record.levelno >= logging.WARNING:
            msg = msg.replace("[trainsup] ", f"[trainsup] {record.levelname.lower()}: ", 1)
        return msg


# Writing to a closed pipe (`| head`), to a terminal that hung up, or to a closed stdout: the
# terminal is gone, the run is not.
_GONE_ERRNOS = frozenset({errno.EPIPE, errno.EIO, errno.EBADF})


def _output_gone(e: BaseException, stream: Any) -> bool:
    if isinstance(e, OSError) and not isinstance(e, io.UnsupportedOperation):
        return e.errno in _GONE_ERRNOS
    return isinstance(e, ValueError) and bool(getattr(stream, "closed", False))


def _silence(stream: Any) -> None:
    """Point the broken stream's fd, and stdout/stderr where they are the same file (a terminal
    that hung up is both), at /dev/null: a later write (Python's final flush of what is still
    buffered, a traceback, click's messages) then neither fails nor turns the exit code into 120."""
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return
    fds = {stream.fileno(), 1, 2}
    devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for fd in sorted(fds):
            try:
                other = os.fstat(fd)
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class Console(logging.Handler):
    """Everything `trainsup run` prints: log lines, child output, and the progress line.

    On a terminal the progress line is redrawn in place under the scrolling output; when
    stdout is not a terminal (journald, a file) there is no redrawing: plain lines only,
    with a progress line every `plain_every_s`.

    When the stream goes away (a closed pipe, a terminal that hung up, a closed file) the
    console says so once, as a warning of the `supervisor.console` logger (it reaches
    logs/supervisor.log, not this console), and writes nothing more: the run goes on.
    """

    def __init__(self, stream: TextIO | None, *, tty: bool | None = None, plain_every_s: float = 30.0) -> None:
        super().__init__(logging.INFO)
        self.stream = stream
        self.gone: str | None = None if stream is not None else "no stdout"
        if tty is None:
            try:
                tty = stream is not None and stream.isatty()
            except (OSError, ValueError):
                tty = False
        self.tty = tty
        self.plain_every_s = plain_every_s
        self._progress = ""
        self._last_plain: float | None = None  # the first running snapshot prints at once
        self._last_draw = 0.0
        self.setFormatter(LineFormatter("[trainsup] %(message)s"))

    def _out(self, text: str) -> None:
        if self.gone is not None:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception as e:
            if not _output_gone(e, self.stream):
                raise
            self._lost(e)

    def _lost(self, e: BaseException) -> None:
        self.gone = f"{type(e).__name__}: {e}"
        _silence(self.stream)
        logging.getLogger("supervisor.console").warning(
            "the terminal is gone (%s): nothing more is printed; the run goes on, its lines "
            "go on in logs/supervisor.log and the ranks' output in logs/attempt-N.log", self.gone)

    def _write_line(self, line: str) -> None:
        if self.tty and self._progress:
            self._out("\r\x1b[K" + line + "\n" + self._progress)
        else:
            self._out(line + "\n")

    def emit(self, record: logging.LogRecord) -> None:
        if self.gone is not None:
            return
        try:
            self._write_line(self.format(record))
        except Exception:  # noqa: BLE001
            self.handleError(record)

    def child_output(self, line: str) -> None:
        self._write_line(line)

    def progress(self, snap: dict[str, Any]) -> None:
        if self.gone is not None:
            return
        now = time.monotonic()
        text = progress_text(snap)
        if self.tty:
            if text != self._progress and now - self._last_draw >= 0.5:
                self._last_draw = now
                self._progress = text
                self._out("\r\x1b[K" + text)
        elif (self._last_plain is None or now - self._last_plain >= self.plain_every_s) and snap.get("state") == "running":
            self._last_plain = now
            self._write_line("[trainsup] " + text)

    def close_line(self) -> None:
        if self.tty and self._progress:
            self._out("\r\x1b[K")
            self._progress = ""


class SupervisorLog(logging.StreamHandler):
    """RUN_DIR/logs/supervisor.log: every line of the `supervisor` logger, with a timestamp,
    appended; the file is created 0600 and never opened through a symlink."""

    NAME = "supervisor.log"

    def __init__(self, logs_dir: Path) -> None:
        path = logs_dir / self.NAME
        try:
            if not logs_dir.is_dir():
                logs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UserError(f"{path} is a symlink; trainsup never follows symlinks in a run dir: "
                                "remove it (or use another --run-dir)") from None
            raise UserError(f"{path}: cannot open the supervisor log: {e.strerror or e}; fix its permissions "
                            "or use another --run-dir") from None
        super().__init__(os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace"))
        self.path = path
        self.setLevel(logging.INFO)
        self.setFormatter(LineFormatter("%(asctime)s [trainsup] %(message)s"))

    def close(self) -> None:
        try:
            self.acquire()
            try:
                if not self.stream.closed:
                    self.stream.close()
            finally:
                self.release()
        finally:
            super().close()


def _fmt_num(v: Any, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def progress_text(s: dict[str, Any]) -> str:
    step = s.get("step")
    max_steps = s.get("max_steps")
    step_txt = "-" if step is None else (f"{step}/{max_steps}" if max_steps else str(step))
    ck = s.get("last_checkpoint") or {}
    parts = [
        f"{s.get('state')} attempt {s.get('attempt')}",
        f"step {step_txt}",
        f"loss {_fmt_num(s.get('loss'), '.4f')}",
        f"tok/s {_fmt_num(s.get('tokens_per_s'), ',.0f')}",
        f"ckpt {ck.get('step', '-')}",
        f"restarts {s.get('restarts', 0)}",
    ]
    return " | ".join(parts)


@contextlib.contextmanager
def supervisor_output(logs_dir: Path, notes: list[str]) -> Iterator[Console]:
    """The "supervisor" logger to the terminal (Console) and to logs/supervisor.log (losing the
    terminal loses nothing) for the life of the block; `notes` are logged first."""
    supervisor_log = SupervisorLog(logs_dir)
    console = Console(sys.stdout)
    root = logging.getLogger("supervisor")
    root.setLevel(logging.INFO)
    root.addHandler(console)
    root.addHandler(supervisor_log)
    root.propagate = False
    for note in notes:
        root.info("%s", note)
    try:
        yield console
    finally:
        console.close_line()
        root.removeHandler(console)
        root.removeHandler(supervisor_log)
        supervisor_log.close()

"""Run ``crdtswarm`` commands as a user would: subprocesses, their output read line by line.

Loaded by the test modules of this directory with `importlib` (tests are not packages
under ``--import-mode=importlib``). No sleeping: `CliProcess.expect` waits for a line
to appear, with a deadline.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO

import pytest

COMMAND = (sys.executable, "-m", "crdtswarm.cli")
LINE_TIMEOUT = 15.0  # seconds: a loaded 2-core machine starts a node in 1 to 3 s
EXIT_TIMEOUT = 10.0


def run(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a command to its end."""
    return subprocess.run(
        [*COMMAND, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Exit status 1, nothing but one ``crdtswarm: error:`` line on stderr, no traceback."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("crdtswarm: error: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


class CliProcess:
    """A long-lived command; a thread reads its stdout into `lines`, another its stderr."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.popen = subprocess.Popen(
            [*COMMAND, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._changed = threading.Condition()
        self._stdout_done = False
        assert self.popen.stdout is not None
        assert self.popen.stderr is not None
        self._threads = [
            threading.Thread(target=self._read, args=(self.popen.stdout, self.lines), daemon=True),
            threading.Thread(
                target=self._read, args=(self.popen.stderr, self.stderr_lines), daemon=True
            ),
        ]
        for thread in self._threads:
            thread.start()

    def _read(self, stream: IO[str], into: list[str]) -> None:
        for line in stream:
            with self._changed:
                into.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            if into is self.lines:
                self._stdout_done = True
            self._changed.notify_all()

    def expect(self, pattern: str, timeout: float = LINE_TIMEOUT) -> str:
        """The first stdout line (seen so far or to come) that ``pattern`` matches at its start.

        Raises:
            AssertionError: no such line within ``timeout`` seconds, or stdout ended.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if regex.match(line):
                        return line
                remaining = deadline - time.monotonic()
                if self._stdout_done or remaining <= 0:
                    why = "stdout ended" if self._stdout_done else f"not within {timeout:g} s"
                    raise AssertionError(f"no line matching {pattern!r} ({why})\n{self.report()}")
                self._changed.wait(remaining)

    def field(self, pattern: str, index: int = 1) -> str:
        """Word ``index`` of the line `expect` finds."""
        return self.expect(pattern).split()[index]

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = EXIT_TIMEOUT) -> int:
        """Send ``sig`` and return the exit status (killing the process after ``timeout``)."""
        self.popen.send_signal(sig)
        try:
            status = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            raise AssertionError(
                f"still running {timeout:g} s after {sig.name}\n{self.report()}"
            ) from None
        self._finish()
        return status

    def kill(self) -> None:
        """End the process at once if it still runs."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(EXIT_TIMEOUT)
        self._finish()

    def _finish(self) -> None:
        for thread in self._threads:
            thread.join(EXIT_TIMEOUT)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()

    def report(self) -> str:
        """What the process printed so far, for failure messages."""
        out = "\n".join(self.lines)
        err = "\n".join(self.stderr_lines)
        return f"$ crdtswarm {' '.join(self.args)}\n--- stdout\n{out}\n--- stderr\n{err}"


@pytest.fixture
def spawn() -> Iterator[Callable[..., CliProcess]]:
    """``spawn(*args)`` starts a long-lived command; every one is killed after the test."""
    started: list[CliProcess] = []

    def start(*args: str) -> CliProcess:
        process = CliProcess(*args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()

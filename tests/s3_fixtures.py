"""A real S3-compatible server for tests (moto's, on 127.0.0.1) and a fault-injecting proxy.

Use from a test module with `from tests.s3_fixtures import *  # noqa: F403` (or import the
fixtures by name). Fixtures:

- `s3_server`: endpoint URL of a moto S3 server, one per test session;
- `s3_bucket`: a fresh, empty bucket name for one test;
- `faulty_s3`: a `FaultyProxy` in front of the server, rules cleared for each test; point
  S3_ENDPOINT_URL at `faulty_s3.endpoint` and call `faulty_s3.inject(...)` (the next N matching
  requests), `faulty_s3.set_flaky(share)` (a random share of all requests) or
  `faulty_s3.schedule_outage(seconds, starts_on=...)` (everything fails for a while);
- `s3_settings`: factory of `Settings` for the bucket (endpoint = the server, or the proxy);
- `hadoop_aws_jars`: hadoop-aws + AWS SDK fetched once into a cache shared across runs
  (`TP_TEST_CACHE_DIR`, default ~/.cache/transaction-processor); `use_shared_ivy(data_dir)`
  makes a test's DATA_DIR use that cache, so Spark needs no download.
"""

from __future__ import annotations

import fcntl
import http.client
import logging
import os
import random
import shutil
import socket
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

TEST_ACCESS_KEY = "AKIATESTLAKE0000"
TEST_SECRET_KEY = "tp-test-secret-6b1f0c2e9a"  # distinctive, so tests can grep logs and output for it

_ERROR_CODES = {
    403: ("AccessDenied", "Access Denied"),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    501: ("NotImplemented", "A header you provided implies functionality that is not implemented"),
    503: ("SlowDown", "Please reduce your request rate."),
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass
class Rule:
    method: str  # "PUT", "GET", ... or "*"
    fault: int | str  # an HTTP status, "reset" (request lost), "reset_after" (applied, answer lost), "hang"
    count: int
    path: Callable[[str], bool] | str | None = None

    def matches(self, method: str, path: str) -> bool:
        if self.count <= 0 or self.method not in ("*", method):
            return False
        if self.path is None:
            return True
        return self.path(path) if callable(self.path) else self.path in path


@dataclass
class Seen:
    method: str
    path: str
    fault: int | str | None
    status: int | None = None  # what the S3 server answered, when the request reached it
    agent: str = ""  # User-Agent: tells botocore (X, Y) from Hadoop S3A (Spark)
    at: float = field(default_factory=time.monotonic)


@dataclass
class FaultyProxy:
    """An HTTP proxy in front of the S3 server that fails the next N matching requests."""

    upstream: str
    endpoint: str = ""
    hang_seconds: float = 3.0
    rules: list[Rule] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    flaky_share: float = 0.0
    flaky_faults: tuple[int | str, ...] = ()
    rng: random.Random = field(default_factory=random.Random)
    outage_seconds: float | None = None
    outage_trigger: Callable[[str, str], bool] | None = None
    outage_faults: tuple[int | str, ...] = (503, "reset")
    outage_started: float | None = None  # time.monotonic() when the scheduled outage began

    def inject(
        self, method: str, fault: int | str, count: int = 1, path: Callable[[str], bool] | str | None = None
    ) -> None:
        """Fail the next `count` requests with `method` (and a path containing `path`)."""
        if not (isinstance(fault, int) or fault in ("reset", "reset_after", "hang")):
            raise ValueError(f"unknown fault {fault!r}")
        with self.lock:
            self.rules.append(Rule(method.upper(), fault, count, path))

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()
            self.seen.clear()
            self.flaky_share = 0.0
            self.outage_seconds = None
            self.outage_trigger = None
            self.outage_started = None

    def set_flaky(
        self, share: float, faults: tuple[int | str, ...] = (503, 500, "reset", "reset_after"), *, seed: int = 0
    ) -> None:
        """Fail a random `share` of all requests with one of `faults` (seeded: the same run, the same dice)."""
        with self.lock:
            self.flaky_share = share
            self.flaky_faults = faults
            self.rng = random.Random(seed)

    def schedule_outage(
        self,
        seconds: float,
        *,
        starts_on: Callable[[str, str], bool] = lambda method, path: True,
        faults: tuple[int | str, ...] = (503, "reset"),
    ) -> None:
        """From the first request `starts_on(method, path)` accepts, answer every request for `seconds` with
        `faults` in turn (503 SlowDown, a dropped connection): the server is down."""
        with self.lock:
            self.outage_seconds = seconds
            self.outage_trigger = starts_on
            self.outage_faults = faults
            self.outage_started = None

    def outage_over(self) -> bool:
        with self.lock:
            return (
                self.outage_started is not None
                and self.outage_seconds is not None
                and time.monotonic() - self.outage_started >= self.outage_seconds
            )

    def _chaos(self, method: str, path: str) -> int | str | None:
        """The fault set_flaky or schedule_outage deal to this request (the lock is held)."""
        if self.outage_seconds is not None:
            if self.outage_started is None and self.outage_trigger is not None and self.outage_trigger(method, path):
                self.outage_started = time.monotonic()
            if self.outage_started is not None and time.monotonic() - self.outage_started < self.outage_seconds:
                return self.outage_faults[len(self.seen) % len(self.outage_faults)]
        if self.flaky_share and self.rng.random() < self.flaky_share:
            return self.rng.choice(self.flaky_faults)
        return None

    def requests(self, method: str | None = None, *, faulted: bool | None = None) -> list[Seen]:
        with self.lock:
            return [
                s
                for s in self.seen
                if (method is None or s.method == method) and (faulted is None or (s.fault is not None) == faulted)
            ]

    def _take(self, method: str, path: str, agent: str = "") -> Seen:
        with self.lock:
            fault = None
            for rule in self.rules:
                if rule.matches(method, path):
                    rule.count -= 1
                    fault = rule.fault
                    break
            if fault is None:
                fault = self._chaos(method, path)
            seen = Seen(method, path, fault, agent=agent)
            self.seen.append(seen)
            return seen


def _make_handler(proxy: FaultyProxy) -> type[BaseHTTPRequestHandler]:
    up = urlsplit(proxy.upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _reset(self) -> None:
            # SO_LINGER 0 makes close() send an RST: the client sees "connection reset by peer".
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

        def _error(self, status: int) -> None:
            code, message = _ERROR_CODES.get(status, (f"HTTP{status}", "injected fault"))
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>{message}</Message>"
                f"<RequestId>{uuid.uuid4().hex[:16]}</RequestId></Error>"
            ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            if status == 503:
                self.send_header("Retry-After", "0")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
            conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, resp.getheaders(), data
            finally:
                conn.close()

        def _handle(self) -> None:
            body = self._body()
            seen = proxy._take(self.command, self.path, self.headers.get("User-Agent", ""))
            fault = seen.fault
            if fault == "reset":
                self._reset()
                return
            if fault == "hang":
                time.sleep(proxy.hang_seconds)
                self._reset()
                return
            if isinstance(fault, int):
                self._error(fault)
                return
            status, headers, data = self._forward(body)
            seen.status = status
            if fault == "reset_after":
                self._reset()
                return
            self.send_response(status)
            for k, v in headers:
                if k.lower() not in _HOP_BY_HOP and k.lower() not in ("server", "date"):
                    self.send_header(k, v)
            if not any(k.lower() == "content-length" for k, _ in headers):
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    return Handler


class ProxyServer:
    def __init__(self, upstream: str) -> None:
        self.proxy = FaultyProxy(upstream=upstream)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self.proxy))
        self.server.daemon_threads = True
        host, port = self.server.server_address[:2]
        self.proxy.endpoint = f"http://{host}:{port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="s3-fault-proxy", daemon=True)

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self.proxy

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL of a moto S3 server on 127.0.0.1 (a free port), for the whole session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def _admin_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=TEST_ACCESS_KEY,
        aws_secret_access_key=TEST_SECRET_KEY,
    )


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket for one test (names are unique, so nothing leaks between tests)."""
    name = f"tp-test-{uuid.uuid4().hex[:12]}"
    _admin_client(s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def _fault_proxy(s3_server: str) -> Iterator[FaultyProxy]:
    with ProxyServer(s3_server) as proxy:
        yield proxy


@pytest.fixture
def faulty_s3(_fault_proxy: FaultyProxy) -> Iterator[FaultyProxy]:
    """The fault-injecting proxy, with no rule and an empty request log."""
    _fault_proxy.clear()
    yield _fault_proxy
    _fault_proxy.clear()


def shared_cache_dir() -> Path:
    """Survives test runs (CI: cache this folder), so the ~700 MB SDK bundle is downloaded once."""
    return Path(os.environ.get("TP_TEST_CACHE_DIR") or Path.home() / ".cache" / "transaction-processor")


def use_shared_ivy(data_dir: Path) -> Path:
    """Point `data_dir/ivy` (where the product keeps its jars) at the shared cache."""
    shared = shared_cache_dir() / "ivy"
    shared.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    link = data_dir / "ivy"
    if not link.exists():
        link.symlink_to(shared, target_is_directory=True)
    return data_dir


@pytest.fixture(scope="session")
def hadoop_aws_jars() -> Iterator[list[Path]]:
    """hadoop-aws and its SDK in the shared cache (downloaded from Maven Central on the first run only)."""
    from config.config import Settings
    from src.utils.spark_utils import fetch_hadoop_aws_jars

    data_dir = use_shared_ivy(Path(tempfile.mkdtemp(prefix="tp-ivy-")))
    settings = Settings.from_env({"DATA_DIR": str(data_dir)}, dotenv=Path("/nonexistent"))
    # One Ivy at a time in the shared cache: pytest-xdist's workers (or two checkouts) start this fixture at once,
    # and the second must find the first one's jars instead of downloading into the same files.
    with open(shared_cache_dir() / "hadoop-aws.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        jars = fetch_hadoop_aws_jars(settings)
    yield jars  # paths through data_dir's link into the shared cache: the link goes only at the session's end
    shutil.rmtree(data_dir, ignore_errors=True)  # the link, never the cache it points to


@pytest.fixture
def s3_settings(s3_server: str, s3_bucket: str):
    """`make(endpoint=None, **env)` -> Settings for `s3_bucket` (endpoint defaults to the server)."""
    from config.config import Settings

    data_dir = tempfile.mkdtemp(prefix="tp-s3-data-")

    def make(endpoint: str | None = None, **overrides: str) -> Settings:
        env = {
            "S3_BUCKET_NAME": s3_bucket,
            "S3_ENDPOINT_URL": endpoint or s3_server,
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
            "DATA_DIR": data_dir,
            "MAX_WORKERS": "4",
        }
        env.update({k: str(v) for k, v in overrides.items()})
        return Settings.from_env(env, dotenv=Path("/nonexistent"))

    yield make
    shutil.rmtree(data_dir, ignore_errors=True)


__all__ = [
    "TEST_ACCESS_KEY",
    "TEST_SECRET_KEY",
    "FaultyProxy",
    "ProxyServer",
    "_fault_proxy",
    "faulty_s3",
    "hadoop_aws_jars",
    "s3_bucket",
    "s3_server",
    "s3_settings",
    "shared_cache_dir",
    "use_shared_ivy",
]

"""A fake Google Drive v3 (and its OAuth token service) over real HTTP on 127.0.0.1, for the Drive source tests.

It speaks the parts of the API the product uses, with Drive's shapes: files.list (q, pageSize,
pageToken, fields), files.get (metadata, and alt=media with Range -> 206 + Content-Range),
files.export, changes.getStartPageToken and changes.list (coalesced per file, paged), and the
service-account JWT grant at /token (RS256 signature checked against the account's public key).
API calls need a bearer token that /token issued. `inject_fault` makes the next matching
requests fail (429, 5xx, 403 rate limit, a stall past the client's timeout, a body cut short, a
corrupted body), optionally with a Retry-After header. `set_flaky` fails a random share of API
requests; `schedule_outage` takes the whole API down (503) for a while from the first request of
one kind. Every request is recorded in `requests`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

FOLDER_MIME = "application/vnd.google-apps.folder"
SHEET_MIME = "application/vnd.google-apps.spreadsheet"
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# google-auth always signs for Google's token endpoint, whatever the key's token_uri says.
GOOGLE_TOKEN_AUD = "https://oauth2.googleapis.com/token"
OPS = (
    "token",
    "files.list",
    "files.get",
    "media",
    "export",
    "changes.getStartPageToken",
    "changes.list",
)


@dataclass
class Fault:
    op: str
    kind: Any  # an HTTP status, "403rate", "timeout", "truncate" or "corrupt"
    times: int
    file_id: str | None = None
    skip: int = 0  # let this many matching requests through first
    delay: float = 2.0
    retry_after: float | None = None  # sent as a Retry-After header (seconds) with an error answer


@dataclass
class Request:
    op: str
    path: str
    query: dict[str, str]
    headers: dict[str, str] = field(default_factory=dict)
    file_id: str | None = None
    fault: Any = None  # the fault this request was answered with, None when served normally


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_fields(text: str) -> dict[str, Any]:
    """Drive's partial-response syntax, `a,b(c,d)`, as {name: sub-spec or None}."""
    pos = 0

    def parse() -> dict[str, Any]:
        nonlocal pos
        out: dict[str, Any] = {}
        name = ""
        while pos < len(text):
            ch = text[pos]
            pos += 1
            if ch == "(":
                out[name.strip()] = parse()
                name = ""
            elif ch == ")":
                break
            elif ch == ",":
                if name.strip():
                    out[name.strip()] = None
                name = ""
            else:
                name += ch
        if name.strip():
            out[name.strip()] = None
        return out

    return parse()


def apply_fields(value: Any, spec: dict[str, Any] | None) -> Any:
    if spec is None:
        return value
    if isinstance(value, list):
        return [apply_fields(v, spec) for v in value]
    if isinstance(value, dict):
        return {k: apply_fields(v, spec[k]) for k, v in value.items() if k in spec}
    return value


class FakeDrive:
    def __init__(self, *, page_size: int = 100, export_limit: int = 10 * 1024 * 1024) -> None:
        self.page_size = page_size
        self.export_limit = export_limit  # Drive refuses to export larger Docs Editors files
        self.files: dict[str, dict[str, Any]] = {}
        self.content: dict[str, bytes] = {}
        self.accounts: dict[str, Any] = {}  # client_email -> RSA public key
        self.tokens: set[str] = set()
        self.granted_scopes: list[str] = []
        self.faults: list[Fault] = []
        self.requests: list[Request] = []
        self._changes: list[tuple[int, str]] = []
        self._flaky_share = 0.0
        self._flaky_kinds: tuple[Any, ...] = ()
        self._random = random.Random(0)
        self._outage_seconds: float | None = None
        self._outage_trigger = "media"
        self.outage_started: float | None = None  # time.monotonic() when the scheduled outage began
        self.chaos: list[tuple[str, Any]] = []  # (op, kind) of every request failed by set_flaky/outage
        self._seq = 1
        self._ids = 0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Self:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-drive", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def api_endpoint(self) -> str:
        return f"{self.url}/drive/v3/"

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    # -- state ----------------------------------------------------------------------------------

    def add_account(self, client_email: str, public_key: Any) -> None:
        self.accounts[client_email] = public_key

    def _new_id(self) -> str:
        self._ids += 1
        return f"1Fk{self._ids:04d}{secrets.token_hex(6)}"

    def _record_change(self, file_id: str) -> None:
        self._changes.append((self._seq, file_id))
        self._seq += 1

    def add_folder(self, name: str, parent: str | None = None) -> str:
        with self._lock:
            file_id = self._new_id()
            self.files[file_id] = {
                "id": file_id,
                "name": name,
                "mimeType": FOLDER_MIME,
                "parents": [parent] if parent else ["root"],
                "trashed": False,
                "modifiedTime": _now(),
            }
            self._record_change(file_id)
            return file_id

    def add_file(self, name: str, content: bytes, parent: str, *, mime_type: str = "text/csv") -> str:
        with self._lock:
            file_id = self._new_id()
            self.files[file_id] = {
                "id": file_id,
                "name": name,
                "mimeType": mime_type,
                "parents": [parent],
                "trashed": False,
            }
            self._set_content(file_id, content)
            self._record_change(file_id)
            return file_id

    def add_sheet(self, name: str, csv_text: str, parent: str) -> str:
        """A native Google Sheet: no size and no md5Checksum, readable only through files.export."""
        with self._lock:
            file_id = self._new_id()
            self.files[file_id] = {
                "id": file_id,
                "name": name,
                "mimeType": SHEET_MIME,
                "parents": [parent],
                "trashed": False,
                "modifiedTime": _now(),
            }
            self.content[file_id] = csv_text.encode("utf-8")
            self._record_change(file_id)
            return file_id

    def _set_content(self, file_id: str, content: bytes) -> None:
        meta = self.files[file_id]
        self.content[file_id] = content
        meta["md5Checksum"] = hashlib.md5(content).hexdigest()
        meta["size"] = str(len(content))
        meta["modifiedTime"] = _now()

    def update_file(
        self, file_id: str, content: bytes | None = None, *, name: str | None = None, parents: list[str] | None = None
    ) -> None:
        with self._lock:
            meta = self.files[file_id]
            if content is not None:
                self._set_content(file_id, content)
            if name is not None:
                meta["name"] = name
            if parents is not None:
                meta["parents"] = list(parents)
            meta["modifiedTime"] = _now()
            self._record_change(file_id)

    def trash_file(self, file_id: str) -> None:
        with self._lock:
            self.files[file_id]["trashed"] = True
            self._record_change(file_id)

    def delete_file(self, file_id: str) -> None:
        with self._lock:
            self.files.pop(file_id)
            self.content.pop(file_id, None)
            self._record_change(file_id)

    def inject_fault(
        self,
        op: str,
        kind: Any,
        *,
        times: int = 1,
        file_id: str | None = None,
        skip: int = 0,
        delay: float = 2.0,
        retry_after: float | None = None,
    ) -> None:
        """Make the next `times` requests of `op` (after `skip` of them) fail with `kind`."""
        assert op in OPS, op
        with self._lock:
            self.faults.append(Fault(op, kind, times, file_id, skip, delay, retry_after))

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()
            self._flaky_share = 0.0
            self._outage_seconds = None

    def set_flaky(self, share: float, kinds: tuple[Any, ...] = (429, "403rate", 500, 503), *, seed: int = 0) -> None:
        """Fail a random `share` of API requests (never the token grant) with one of `kinds`."""
        with self._lock:
            self._flaky_share = share
            self._flaky_kinds = kinds
            self._random = random.Random(seed)

    def schedule_outage(self, seconds: float, *, starts_on: str = "media") -> None:
        """The whole API answers 503 for `seconds`, from the first `starts_on` request on."""
        assert starts_on in OPS, starts_on
        with self._lock:
            self._outage_seconds = seconds
            self._outage_trigger = starts_on
            self.outage_started = None

    def outage_over(self) -> bool:
        with self._lock:
            return (
                self.outage_started is not None
                and self._outage_seconds is not None
                and (time.monotonic() - self.outage_started >= self._outage_seconds)
            )

    def _chaos(self, op: str) -> Fault | None:
        """The fault set_flaky or schedule_outage deal to this request, if any."""
        if op == "token":
            return None
        with self._lock:
            kind = None
            if self._outage_seconds is not None:
                if self.outage_started is None and op == self._outage_trigger:
                    self.outage_started = time.monotonic()
                if self.outage_started is not None and time.monotonic() - self.outage_started < self._outage_seconds:
                    kind = 503
            if kind is None and self._flaky_share and self._random.random() < self._flaky_share:
                kind = self._random.choice(self._flaky_kinds)
            if kind is None:
                return None
            self.chaos.append((op, kind))
            return Fault(op, kind, 1)

    def count(self, op: str, file_id: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.op == op and (file_id is None or r.file_id == file_id))

    def of(self, op: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.op == op]

    # -- request handling (called from the server threads) ---------------------------------------

    def _take_fault(self, op: str, file_id: str | None) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.op != op or (fault.file_id and fault.file_id != file_id) or fault.times <= 0:
                    continue
                if fault.skip > 0:
                    fault.skip -= 1
                    return None
                fault.times -= 1
                return fault
        return None

    def _public(self, meta: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "drive#file", **meta}

    def list_files(self, query: dict[str, str]) -> tuple[int, Any]:
        q = query.get("q", "")
        prefix, suffix = "'", "' in parents and trashed = false"
        if not (q.startswith(prefix) and q.endswith(suffix)) or "'" in q[1 : -len(suffix)]:
            return _error(400, "invalid", f"Invalid Value: q={q}")
        parent = q[1 : -len(suffix)]
        size = min(int(query.get("pageSize", "100")), self.page_size)
        with self._lock:
            matches = [
                self._public(m) for m in self.files.values() if parent in m.get("parents", []) and not m["trashed"]
            ]
        start = int(query["pageToken"].removeprefix("page-")) if query.get("pageToken") else 0
        body: dict[str, Any] = {
            "kind": "drive#fileList",
            "incompleteSearch": False,
            "files": matches[start : start + size],
        }
        if start + size < len(matches):
            body["nextPageToken"] = f"page-{start + size}"
        return 200, body

    def get_file(self, file_id: str) -> tuple[int, Any]:
        with self._lock:
            meta = self.files.get(file_id)
            if meta is None:
                return _error(404, "notFound", f"File not found: {file_id}.")
            return 200, self._public(meta)

    def start_token(self) -> tuple[int, Any]:
        with self._lock:
            return 200, {"kind": "drive#startPageToken", "startPageToken": str(self._seq)}

    def list_changes(self, query: dict[str, str]) -> tuple[int, Any]:
        token = query.get("pageToken", "")
        with self._lock:
            if not token.isdigit() or not 1 <= int(token) <= self._seq:
                return _error(400, "invalid", f"Invalid Value: pageToken={token}")
            start = int(token)
            size = min(int(query.get("pageSize", "100")), self.page_size)
            latest: dict[str, int] = {}
            for seq, file_id in self._changes:
                if seq >= start:
                    latest[file_id] = seq  # Drive reports a file once, at its latest change
            ordered = sorted((seq, fid) for fid, seq in latest.items())
            page, rest = ordered[:size], ordered[size:]
            changes = []
            for _seq, file_id in page:
                meta = self.files.get(file_id)
                change: dict[str, Any] = {
                    "kind": "drive#change",
                    "changeType": "file",
                    "fileId": file_id,
                    "time": _now(),
                    "removed": meta is None,
                }
                if meta is not None:
                    change["file"] = self._public(meta)
                changes.append(change)
            body: dict[str, Any] = {"kind": "drive#changeList", "changes": changes}
            if rest:
                body["nextPageToken"] = str(rest[0][0])
            else:
                body["newStartPageToken"] = str(self._seq)
            return 200, body

    def grant(self, form: dict[str, str]) -> tuple[int, Any]:
        def refuse(description: str) -> tuple[int, Any]:
            return 400, {"error": "invalid_grant", "error_description": description}

        if form.get("grant_type") != JWT_GRANT:
            return 400, {"error": "unsupported_grant_type", "error_description": "Invalid grant_type"}
        try:
            head, payload, signature = form.get("assertion", "").split(".")
            header = json.loads(_b64url_decode(head))
            claims = json.loads(_b64url_decode(payload))
        except ValueError:
            return refuse("Invalid JWT.")
        key = self.accounts.get(claims.get("iss", ""))
        if key is None or header.get("alg") != "RS256":
            return refuse("Invalid grant: account not found")
        try:
            key.verify(_b64url_decode(signature), f"{head}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return refuse("Invalid JWT Signature.")
        if claims.get("aud") not in (GOOGLE_TOKEN_AUD, self.token_uri) or claims.get("exp", 0) < time.time():
            return refuse("Invalid JWT: Token must be a short-lived token and in a reasonable timeframe.")
        access = "ya29.fake-" + secrets.token_urlsafe(24)
        with self._lock:
            self.tokens.add(access)
            self.granted_scopes.append(claims.get("scope", ""))
        return 200, {"access_token": access, "expires_in": 3599, "token_type": "Bearer"}


def _error(status: int, reason: str, message: str) -> tuple[int, Any]:
    domain = "usageLimits" if reason.endswith("RateLimitExceeded") or status == 429 else "global"
    return status, {
        "error": {
            "code": status,
            "message": message,
            "errors": [{"domain": domain, "reason": reason, "message": message}],
        }
    }


_FAULT_ERRORS = {
    429: ("rateLimitExceeded", "Rate Limit Exceeded"),
    500: ("backendError", "Internal Error"),
    502: ("backendError", "Bad Gateway"),
    503: ("backendError", "Service Unavailable"),
    "403rate": ("userRateLimitExceeded", "User Rate Limit Exceeded"),
}


def _make_handler(fake: FakeDrive) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            data = body if isinstance(body, (bytes, memoryview)) else json.dumps(body).encode()
            self.send_response(status)
            if not isinstance(body, (bytes, memoryview)):
                self.send_header("Content-Type", "application/json; charset=UTF-8")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self) -> tuple[str | None, str | None, dict[str, str]]:
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
            path = url.path
            if self.command == "POST" and path == "/token":
                return "token", None, query
            if self.command != "GET" or not path.startswith("/drive/v3/"):
                return None, None, query
            rest = path.removeprefix("/drive/v3/")
            if rest == "files":
                return "files.list", None, query
            if rest == "changes":
                return "changes.list", None, query
            if rest == "changes/startPageToken":
                return "changes.getStartPageToken", None, query
            parts = rest.split("/")
            if parts[0] == "files" and len(parts) == 2:
                file_id = urllib.parse.unquote(parts[1])
                return ("media" if query.get("alt") == "media" else "files.get"), file_id, query
            if parts[0] == "files" and len(parts) == 3 and parts[2] == "export":
                return "export", urllib.parse.unquote(parts[1]), query
            return None, None, query

        def do_POST(self) -> None:
            self._handle()

        def do_GET(self) -> None:
            self._handle()

        def _handle(self) -> None:
            op, file_id, query = self._route()
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            request = Request(
                op or "unknown", self.path, query, {k.lower(): v for k, v in self.headers.items()}, file_id
            )
            with fake._lock:
                fake.requests.append(request)
            if op is None:
                self._send(*_error(404, "notFound", f"no such method: {self.command} {self.path}"))
                return
            fault = fake._take_fault(op, file_id) or fake._chaos(op)
            request.fault = fault.kind if fault is not None else None
            if fault is not None and fault.kind == "timeout":
                fake._stop.wait(fault.delay)  # the client has given up by now; answer anyway
                fault = None
            if fault is not None and fault.kind in _FAULT_ERRORS:
                reason, message = _FAULT_ERRORS[fault.kind]
                status = 403 if fault.kind == "403rate" else int(fault.kind)
                extra = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
                self._send(*_error(status, reason, message), extra)
                return
            if op == "token":
                form = dict(urllib.parse.parse_qsl(raw.decode("utf-8")))
                self._send(*fake.grant(form))
                return
            auth = self.headers.get("Authorization", "")
            if not auth.startswith("Bearer ") or auth.removeprefix("Bearer ") not in fake.tokens:
                self._send(*_error(401, "authError", "Invalid Credentials"))
                return
            if op == "files.list":
                status, body = fake.list_files(query)
            elif op == "files.get":
                status, body = fake.get_file(file_id or "")
            elif op == "changes.getStartPageToken":
                status, body = fake.start_token()
            elif op == "changes.list":
                status, body = fake.list_changes(query)
            elif op == "export":
                self._export(file_id or "", query)
                return
            else:
                self._media(file_id or "", fault)
                return
            if status == 200 and query.get("fields"):
                body = apply_fields(body, parse_fields(query["fields"]))
            self._send(status, body)

        def _export(self, file_id: str, query: dict[str, str]) -> None:
            with fake._lock:
                meta = fake.files.get(file_id)
                data = fake.content.get(file_id, b"")
            if meta is None:
                self._send(*_error(404, "notFound", f"File not found: {file_id}."))
            elif meta["mimeType"] != SHEET_MIME or query.get("mimeType") != "text/csv":
                self._send(*_error(403, "fileNotExportable", "Export only supports Docs Editors files."))
            elif len(data) > fake.export_limit:
                self._send(*_error(403, "exportSizeLimitExceeded", "This file is too large to be exported."))
            else:
                self._send(200, data, {"Content-Type": "text/csv"})

        def _media(self, file_id: str, fault: Fault | None) -> None:
            with fake._lock:
                meta = fake.files.get(file_id)
                data = fake.content.get(file_id)
            if meta is None or data is None:
                self._send(*_error(404, "notFound", f"File not found: {file_id}."))
                return
            if meta["mimeType"].startswith("application/vnd.google-apps."):
                self._send(*_error(403, "fileNotDownloadable", "Only files with binary content can be downloaded."))
                return
            total = len(data)
            status, start, end, headers = 200, 0, total - 1, {"Content-Type": meta["mimeType"]}
            rng = self.headers.get("Range", "")
            if rng.startswith("bytes="):
                first, _, last = rng.removeprefix("bytes=").partition("-")
                start = int(first)
                end = min(int(last), total - 1) if last else total - 1
                if start >= total:
                    self._send(416, b"", {"Content-Range": f"bytes */{total}"})
                    return
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{total}"
            body: bytes | memoryview = memoryview(data)[start : end + 1]
            if fault is not None and fault.kind == "corrupt" and len(body):
                corrupted = bytearray(body)
                corrupted[0] ^= 0xFF
                body = bytes(corrupted)
            if fault is not None and fault.kind == "truncate":
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self._send(status, body, headers)

        def handle_one_request(self) -> None:
            try:
                super().handle_one_request()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

    return Handler

"""Google Drive as Mechanism X's source: one folder (not its subfolders), read with a service account.

The first poll of a process lists the folder in full; later polls read only the Drive Changes
feed from a page token kept in PostgreSQL (`kv_state`), so a poll costs O(changes), not
O(folder). Downloads are streamed in Range chunks to a temporary file under
DATA_DIR/downloads and checked against Drive's md5Checksum.

Every Drive request (list, changes, get, download chunk, export) goes once through the product's
retry policy (`call_with_retry`, dependency "Drive"), honouring Retry-After; googleapiclient's and
httplib2's own retries are off. A Drive outage of any length only delays the work: a download
resumes at the first byte not yet received. `DownloadFailed` (the caller marks the file failed) is
kept for what waiting cannot fix: the file is gone (404), Drive refuses it (a 403 that is not a rate
limit), its md5 still differs after re-downloads, or a Sheet is too large to export.
Google Sheets are exported as CSV (first tab only; Drive caps exports at 10 MB). A Sheet has no
md5Checksum, so each new version is exported once while listing and the md5 of that CSV is its
checksum (the ledger then sees an unchanged Sheet as unchanged).

The service-account key is never logged or put in an error message: errors name the key's
path and the account's client_email, nothing else from the file. The account is logged once, when
the folder is checked at start; `describe()` (which lands in the lake's processing log) names only
the folder and the endpoint, never the account.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import logging
import os
import re
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import google.auth.exceptions
import google_auth_httplib2
import httplib2
from google.oauth2 import service_account
from googleapiclient.discovery import build
from googleapiclient.errors import HttpError
from googleapiclient.http import MediaIoBaseDownload

from config.config import Settings, redact_url
from src.errors import RetryableError, SettingsError, SourceError, is_retryable
from src.utils.retry import brief, call_with_retry
from src.utils.sources import Source, SourceFile

log = logging.getLogger(__name__)

SCOPES = ["https://www.googleapis.com/auth/drive.readonly"]
DEFAULT_API_ENDPOINT = "https://www.googleapis.com/drive/v3/"
FOLDER_MIME = "application/vnd.google-apps.folder"
SHEET_MIME = "application/vnd.google-apps.spreadsheet"
CSV_MIME = "text/csv"

FILE_FIELDS = "id,name,mimeType,md5Checksum,size,modifiedTime"
LIST_FIELDS = f"nextPageToken,files({FILE_FIELDS})"
CHANGE_FIELDS = (
    f"nextPageToken,newStartPageToken,changes(changeType,removed,fileId,file({FILE_FIELDS},parents,trashed))"
)
PAGE_SIZE = 1000

CHUNK_SIZE = 8 * 1024 * 1024  # bytes per Range request: bounds memory per download
HTTP_TIMEOUT = 60.0  # seconds per HTTP request
MD5_ATTEMPTS = 3  # full downloads before a checksum mismatch is final
TEMP_SUFFIX = ".csv.part"

# httplib2 silently repeats a request once on some socket errors: a second retry layer under ours.
httplib2.RETRIES = 1

T = TypeVar("T")


class DownloadFailed(SourceError):
    """A file could not be downloaded intact after the retries; the message says why."""


def _http_reason(exc: HttpError) -> str:
    """The Drive error reason (`notFound`, `rateLimitExceeded`, ...) or ''."""
    try:
        data = json.loads(exc.content.decode("utf-8"))
        errors = data["error"].get("errors") or []
        if errors and isinstance(errors[0], dict):
            return str(errors[0].get("reason", ""))
        return str(data["error"].get("status", ""))
    except (ValueError, KeyError, AttributeError, TypeError):
        return ""


def _http_message(exc: HttpError) -> str:
    try:
        data = json.loads(exc.content.decode("utf-8"))
        message = str(data["error"].get("message", ""))
    except (ValueError, KeyError, AttributeError, TypeError):
        message = ""
    return message.splitlines()[0][:200] if message else (exc.resp.reason or "")


def _describe_error(exc: BaseException) -> str:
    """One short line for logs and ledger reasons (never a header, a token or the key)."""
    if isinstance(exc, HttpError):
        reason = _http_reason(exc)
        text = f"HTTP {exc.resp.status}"
        if reason:
            text += f" {reason}"
        message = _http_message(exc)
        return f"{text}: {message}" if message else text
    if isinstance(exc, google.auth.exceptions.GoogleAuthError):
        first = str(exc.args[0]) if exc.args else ""
        return f"{type(exc).__name__}: {first.splitlines()[0][:200] if first else 'token request failed'}"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def _retryable(exc: BaseException) -> bool:
    """`is_retryable`, plus the transport faults only this client meets: the token service unreachable
    or answering 5xx, a body cut short (IncompleteRead), a TLS record broken mid-stream."""
    if isinstance(exc, google.auth.exceptions.RefreshError):
        return bool(getattr(exc, "retryable", False))
    if isinstance(exc, (google.auth.exceptions.TransportError, http.client.HTTPException, ssl.SSLError)):
        return True
    return is_retryable(exc)


def _parse_time(value: str | None) -> datetime:
    if not value:
        return datetime.fromtimestamp(0, tz=UTC)
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _is_candidate(meta: dict[str, Any]) -> bool:
    mime = meta.get("mimeType", "")
    if mime == SHEET_MIME:
        return True
    if mime.startswith("application/vnd.google-apps."):
        return False
    return mime == CSV_MIME or str(meta.get("name", "")).lower().endswith(".csv")


def _to_source_file(meta: dict[str, Any]) -> SourceFile:
    return SourceFile(
        file_id=meta["id"],
        name=meta.get("name", ""),
        size=int(meta.get("size") or 0),
        modified_time=_parse_time(meta.get("modifiedTime")),
        checksum=meta.get("md5Checksum"),
        mime_type=meta.get("mimeType", CSV_MIME),
    )


def load_credentials(path: Path) -> service_account.Credentials:
    """The service-account credentials in `path`, or a one-line SettingsError saying what to do."""
    var = f"GOOGLE_CREDENTIALS_PATH={path}"
    how = "create a JSON key for a service account (Google Cloud console > IAM > Service accounts > Keys)"
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise SettingsError(f"{var} does not exist: {how} and save it there") from None
    except IsADirectoryError:
        raise SettingsError(f"{var} is a directory, not a key file: point it at the JSON key") from None
    except PermissionError:
        raise SettingsError(f"{var} is not readable by this user: fix its permissions (chmod 600, owner)") from None
    except OSError as exc:
        raise SettingsError(f"{var} cannot be read ({exc.strerror}): check the path") from None
    try:
        info = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SettingsError(f"{var} is not a JSON key file: {how} and download it as JSON") from None
    if not isinstance(info, dict):
        raise SettingsError(f"{var} is not a JSON key file: {how} and download it as JSON")
    kind = info.get("type")
    if kind != "service_account":
        raise SettingsError(
            f"{var} holds a key of type {str(kind)[:40]!r}, not 'service_account': {how}; "
            "user (OAuth) credentials are not supported"
        )
    missing = [k for k in ("client_email", "private_key", "token_uri") if not info.get(k)]
    if missing:
        raise SettingsError(f"{var} is not a complete service-account key (missing {', '.join(missing)}): {how}")
    try:
        return service_account.Credentials.from_service_account_info(info, scopes=SCOPES)
    except (ValueError, TypeError, google.auth.exceptions.GoogleAuthError):
        raise SettingsError(
            f"{var}: the private key of {info['client_email']} cannot be read: download a new key for it"
        ) from None


class _NullFile:
    def write(self, data: bytes) -> int:
        return len(data)


class _HashingWriter:
    """A file handle that hashes what is written, so the md5 check costs no second read."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.size = 0

    def write(self, data: bytes) -> int:
        self.md5.update(data)
        self.size += len(data)
        return self.fh.write(data)

    def restart(self) -> None:
        self.fh.seek(0)
        self.fh.truncate()
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.size = 0


class GoogleDriveSource(Source):
    """The files directly in GDRIVE_FOLDER_ID, as seen by the service account of GOOGLE_CREDENTIALS_PATH.

    `stop` ends a wait for Drive (the worker is stopping); `give_up_after` (seconds) bounds it, for
    tools and tests. Either way the call then raises `RetryableError`: not done, try on a later poll.
    """

    kind = "gdrive"

    def __init__(
        self,
        settings: Settings,
        db: Any,
        *,
        stop: threading.Event | None = None,
        give_up_after: float | None = None,
        chunk_size: int = CHUNK_SIZE,
        timeout: float = HTTP_TIMEOUT,
    ) -> None:
        if not settings.gdrive_folder_id:
            raise SettingsError("GDRIVE_FOLDER_ID is not set: the Google Drive source needs a folder id")
        self.settings = settings
        self.db = db
        self.folder_id = settings.gdrive_folder_id
        endpoint = settings.gdrive_api_endpoint or DEFAULT_API_ENDPOINT
        self.api_endpoint = endpoint if endpoint.endswith("/") else endpoint + "/"
        self.stop = stop
        self.give_up_after = give_up_after
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.downloads = settings.data_dir / "downloads"
        self._creds: service_account.Credentials | None = None
        self._local = threading.local()
        self._https: list[httplib2.Http] = []
        self._lock = threading.Lock()
        self._files: dict[str, SourceFile] = {}
        # Sheet id -> (modifiedTime, md5 and size of its CSV export, or why it failed): one export per version.
        self._sheets: dict[str, tuple[str, str | None, str | None, int]] = {}
        self._token: str | None = None
        self._persisted: str | None = None
        self._listed = False
        self._checked = False
        self._remove_stale_downloads()

    # -- set-up ---------------------------------------------------------------------------------

    @property
    def client_email(self) -> str:
        return self._credentials().service_account_email

    @property
    def token_key(self) -> str:
        """The kv_state key of the Changes page token: per account (tokens are per user) and folder."""
        return f"gdrive.changes_token:{self.client_email}:{self.folder_id}"

    def _credentials(self) -> service_account.Credentials:
        with self._lock:
            if self._creds is None:
                self._creds = load_credentials(self.settings.google_credentials_path)
            return self._creds

    def _service(self) -> Any:
        """A Drive client for this thread: httplib2 connections must not be shared between threads."""
        service = getattr(self._local, "service", None)
        if service is None:
            creds = self._credentials()
            raw = httplib2.Http(timeout=self.timeout)
            with self._lock:
                self._https.append(raw)
            service = build(
                "drive",
                "v3",
                http=google_auth_httplib2.AuthorizedHttp(creds, http=raw),
                client_options={"api_endpoint": self.api_endpoint},
                static_discovery=True,
                cache_discovery=False,
            )
            self._local.service = service
        return service

    def check(self) -> None:
        """Fail at start, in one line, when the key or the folder cannot be used."""
        creds = self._credentials()
        email = creds.service_account_email
        var = f"GDRIVE_FOLDER_ID={self.folder_id}"
        try:
            meta = self._call(
                "get folder",
                lambda: (
                    self._service()
                    .files()
                    .get(fileId=self.folder_id, fields="id,name,mimeType,trashed", supportsAllDrives=True)
                    .execute(num_retries=0)
                ),
            )
        except HttpError as exc:
            status, reason = exc.resp.status, _http_reason(exc)
            if status == 404:
                raise SourceError(
                    f"{var} was not found or is not shared with {email}: share the folder with {email} "
                    "(Viewer is enough) and check the id (the last part of the folder's URL)"
                ) from None
            if status == 403 and reason in {"accessNotConfigured", "SERVICE_DISABLED"}:
                raise SourceError(
                    f"the Google Drive API is not enabled for the project of {email}: enable it in the "
                    "Google Cloud console (APIs & Services > Library > Google Drive API)"
                ) from None
            if status in (401, 403):
                raise SourceError(
                    f"{var} cannot be read by {email} ({_describe_error(exc)}): share the folder with {email}"
                ) from None
            raise SourceError(f"{var} cannot be checked: {_describe_error(exc)}") from None
        if meta.get("mimeType") != FOLDER_MIME:
            raise SourceError(
                f"{var} is a file ({meta.get('mimeType')}), not a folder: copy the id from the folder's URL"
            )
        if meta.get("trashed"):
            raise SourceError(f"{var} is in the Drive trash: restore it or use another folder")
        self._checked = True
        log.info("Google Drive folder %s (%s) is readable by %s", self.folder_id, meta.get("name", ""), email)

    def describe(self) -> str:
        """Folder and endpoint only: this text goes into the lake's processing log, the account must not."""
        return f"Google Drive folder {self.folder_id} via {redact_url(self.api_endpoint)}"

    def close(self) -> None:
        with self._lock:
            for h in self._https:
                for conn in list(h.connections.values()):
                    try:
                        conn.close()
                    except OSError:
                        pass
                h.connections.clear()
            self._https.clear()
        self._local = threading.local()

    # -- the one retry layer ---------------------------------------------------------------------

    def _refused(self, exc: BaseException) -> SettingsError:
        return SettingsError(
            f"GOOGLE_CREDENTIALS_PATH={self.settings.google_credentials_path}: the token service refused the key "
            f"of {self.client_email} ({_describe_error(exc)}): the key may be deleted or disabled, create a new one"
        )

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one Drive request under the product's retry policy, waiting out transient faults.

        A refused key becomes SettingsError; a transient fault still there when the worker stops
        becomes RetryableError; every other error passes through at once.
        """
        try:
            return call_with_retry(
                fn,
                dependency="Drive",
                what=what,
                target=redact_url(self.api_endpoint),
                stop=self.stop,
                give_up_after=self.give_up_after,
                retryable=_retryable,
            )
        except google.auth.exceptions.RefreshError as exc:
            if _retryable(exc):
                raise RetryableError(f"Drive {what} not done: {_describe_error(exc)}") from exc
            raise self._refused(exc) from None
        except Exception as exc:
            if not _retryable(exc):
                raise
            raise RetryableError(f"Drive {what} not done: {brief(exc)}") from exc

    # -- discovery ------------------------------------------------------------------------------

    def _load_token(self) -> str | None:
        rows = self.db.query("SELECT value FROM kv_state WHERE key = %s", (self.token_key,))
        return rows[0][0] if rows else None

    def _save_token(self, token: str) -> None:
        self.db.execute(
            "INSERT INTO kv_state (key, value, updated_at) VALUES (%s, %s, now()) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
            (self.token_key, token),
        )

    def _start_token(self) -> str:
        resp = self._call(
            "changes.getStartPageToken",
            lambda: self._service().changes().getStartPageToken(supportsAllDrives=True).execute(num_retries=0),
        )
        return str(resp["startPageToken"])

    def _full_listing(self) -> dict[str, SourceFile]:
        files: dict[str, SourceFile] = {}
        query = f"'{self.folder_id}' in parents and trashed = false"
        page_token: str | None = None
        pages = 0
        while True:
            kwargs: dict[str, Any] = {
                "q": query,
                "fields": LIST_FIELDS,
                "pageSize": PAGE_SIZE,
                "supportsAllDrives": True,
                "includeItemsFromAllDrives": True,
            }
            if page_token:
                kwargs["pageToken"] = page_token
            resp = self._call("files.list", lambda kw=kwargs: self._service().files().list(**kw).execute(num_retries=0))
            pages += 1
            for meta in resp.get("files", []):
                if _is_candidate(meta):
                    files[meta["id"]] = self._source_file(meta)
            page_token = resp.get("nextPageToken")
            if not page_token:
                break
        log.info("Drive folder %s listed in full: %d CSV candidates (%d pages)", self.folder_id, len(files), pages)
        return files

    def _source_file(self, meta: dict[str, Any]) -> SourceFile:
        f = _to_source_file(meta)
        if f.mime_type != SHEET_MIME:
            return f
        version = str(meta.get("modifiedTime", ""))
        known = self._sheets.get(f.file_id)
        if known is None or known[0] != version:
            known = self._sheet_digest(f, version)
            self._sheets[f.file_id] = known
        return dataclasses.replace(f, checksum=known[1], size=known[3])

    def _sheet_digest(self, f: SourceFile, version: str) -> tuple[str, str | None, str | None, int]:
        """Sheets have no md5Checksum: export each new version once so the checksum is that of its CSV."""
        sink = _HashingWriter(_NullFile())
        try:
            self._download_once(f, sink, exported=True)
        except DownloadFailed as exc:  # not a RetryableError: an outage fails the poll, not this version
            log.warning("Drive sheet %s (%s) cannot be exported as CSV: %s", f.file_id, f.name, exc)
            return (version, None, str(exc), 0)
        log.info("Drive sheet %s (%s) version %s: CSV export md5 %s", f.file_id, f.name, version, sink.md5.hexdigest())
        return (version, sink.md5.hexdigest(), None, sink.size)

    def _apply_changes(self, token: str) -> str:
        """Apply every change since `token` to the in-memory map; return the token for the next poll."""
        page_token = token
        seen = 0
        while True:
            resp = self._call(
                "changes.list",
                lambda current=page_token: (
                    self._service()
                    .changes()
                    .list(
                        pageToken=current,
                        fields=CHANGE_FIELDS,
                        pageSize=PAGE_SIZE,
                        includeRemoved=True,
                        spaces="drive",
                        supportsAllDrives=True,
                        includeItemsFromAllDrives=True,
                    )
                    .execute(num_retries=0)
                ),
            )
            for change in resp.get("changes", []):
                if change.get("changeType", "file") != "file":
                    continue
                seen += 1
                self._apply_change(change)
            if resp.get("newStartPageToken"):
                if seen:
                    log.info("Drive changes applied: %d since the last poll", seen)
                return str(resp["newStartPageToken"])
            page_token = resp.get("nextPageToken")
            if not page_token:
                raise RetryableError("Drive changes.list answered with neither nextPageToken nor newStartPageToken")

    def _apply_change(self, change: dict[str, Any]) -> None:
        file_id = change.get("fileId")
        meta = change.get("file") or {}
        in_folder = self.folder_id in (meta.get("parents") or [])
        if change.get("removed") or meta.get("trashed") or not in_folder or not _is_candidate(meta):
            gone = self._files.pop(file_id, None)
            if gone is not None:
                log.info("Drive file %s (%s) left the folder (removed, trashed or moved)", file_id, gone.name)
            return
        new = self._source_file(meta)
        old = self._files.get(file_id)
        if old != new:
            log.info("Drive file %s (%s) %s, md5 %s", file_id, new.name, "changed" if old else "added", new.checksum)
        self._files[file_id] = new

    def list_files(self) -> list[SourceFile]:
        """The CSV candidates now directly in the folder, and its Google Sheets (read as CSV exports)."""
        try:
            return self._list_files()
        except HttpError as exc:
            raise SourceError(f"Drive folder {self.folder_id} cannot be listed: {_describe_error(exc)}") from None

    def _list_files(self) -> list[SourceFile]:
        if not self._checked:
            self.check()
        if not self._listed:
            token = self._persisted = self._load_token()
            if token is None:
                token = self._start_token()  # before listing, so nothing between the two is missed
            self._files = self._full_listing()
            self._token = token
            self._listed = True
        try:
            new_token = self._apply_changes(self._token)
        except HttpError as exc:
            if exc.resp.status not in (400, 404, 410):
                raise SourceError(f"Drive changes.list failed: {_describe_error(exc)}") from None
            log.warning("Drive change token no longer valid (%s): listing the folder again", _describe_error(exc))
            new_token = self._start_token()
            self._files = self._full_listing()
        if new_token != self._persisted:
            self._save_token(new_token)
            self._persisted = new_token
        self._token = new_token
        return sorted(self._files.values(), key=lambda f: (f.modified_time, f.file_id))

    # -- download -------------------------------------------------------------------------------

    def _remove_stale_downloads(self) -> None:
        """Temporary files left by a killed process: never read again, so never kept."""
        if not self.downloads.is_dir():
            return
        for stale in self.downloads.glob(f"gdrive-*{TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)

    def _temp_path(self, f: SourceFile) -> Path:
        self.downloads.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_-]", "_", f.file_id)[:80] or "file"
        fd, name = tempfile.mkstemp(prefix=f"gdrive-{safe}-", suffix=TEMP_SUFFIX, dir=self.downloads)
        os.close(fd)
        return Path(name)

    @contextmanager
    def fetch(self, f: SourceFile) -> Iterator[Path]:
        """The file's bytes (a Sheet's CSV export) in a temporary file, deleted when the block exits."""
        path = self._temp_path(f)
        try:
            self._download(f, path)
            yield path
        finally:
            path.unlink(missing_ok=True)

    def _download(self, f: SourceFile, path: Path) -> None:
        exported = f.mime_type == SHEET_MIME
        expected = f.checksum
        if exported and expected is None:
            known = self._sheets.get(f.file_id)
            if known and known[2] and _parse_time(known[0]) == f.modified_time:
                raise DownloadFailed(known[2])  # the same version already failed to export while listing
        with open(path, "wb") as fh:
            out = _HashingWriter(fh)
            for round_ in range(1, MD5_ATTEMPTS + 1):
                if round_ > 1:
                    out.restart()
                self._download_once(f, out, exported)
                got = out.md5.hexdigest()
                if expected is None or got == expected:
                    fh.flush()
                    log.info("Drive file %s downloaded: %d bytes, md5 %s", f.file_id, out.size, got)
                    return
                reason = f"md5 mismatch: Drive says {expected}, downloaded {out.size} bytes with md5 {got}"
                if round_ == MD5_ATTEMPTS:
                    raise DownloadFailed(f"Drive file {f.file_id} ({f.name}): {reason} after {round_} downloads")
                log.warning(
                    "Drive file %s: %s (download %d/%d); downloading again", f.file_id, reason, round_, MD5_ATTEMPTS
                )

    def _download_once(self, f: SourceFile, out: _HashingWriter, exported: bool) -> None:
        """Every byte of one download into `out`: each Range request is retried by `_call`, and a retry
        resumes at the first byte not yet received (the downloader only advances after a whole chunk)."""
        files = self._service().files()
        if exported:
            request = files.export_media(fileId=f.file_id, mimeType=CSV_MIME)
        else:
            request = files.get_media(fileId=f.file_id, supportsAllDrives=True)
        downloader = MediaIoBaseDownload(out, request, chunksize=self.chunk_size)
        what = f"{'export' if exported else 'download'} of {f.file_id}"
        done = False
        while not done:
            try:
                _, done = self._call(what, lambda: downloader.next_chunk(num_retries=0))
            except HttpError as exc:
                raise self._unfetchable(f, exc) from None

    def _unfetchable(self, f: SourceFile, exc: HttpError) -> DownloadFailed:
        """What a permanent HTTP answer to a download means for the file, in one line."""
        where = f"Drive file {f.file_id} ({f.name})"
        if exc.resp.status == 404:
            return DownloadFailed(f"{where} is gone: HTTP 404")
        if _http_reason(exc) == "exportSizeLimitExceeded":
            return DownloadFailed(
                f"{where}: the Sheet is larger than Drive's 10 MB CSV export limit; download it as CSV and put "
                "the .csv in the folder instead"
            )
        return DownloadFailed(f"{where}: {_describe_error(exc)}")


__all__ = ["DownloadFailed", "GoogleDriveSource", "load_credentials"]

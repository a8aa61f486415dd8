"""The Google Drive source against a fake Drive v3 over HTTP: auth, listing, Changes, downloads, faults."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from src.errors import RetryableError, SettingsError, SourceError
from src.utils import gdrive_source, retry
from src.utils.gdrive_source import DEFAULT_API_ENDPOINT, MD5_ATTEMPTS, DownloadFailed, GoogleDriveSource
from tests.fake_drive import FakeDrive, parse_fields

EMAIL = "ingest@tp-test.iam.gserviceaccount.com"
CHUNK = 256 * 1024
WAIT_LINE = "waiting for Drive at "
DEADLINE = 60.0  # seconds: generous, polled; a healthy call takes well under a second


def until(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def wait_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(WAIT_LINE)]


def in_thread(fn) -> tuple[threading.Thread, list]:
    """Run `fn` in a thread; the list receives its result or the exception it raised."""
    out: list = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    return worker, out


@pytest.fixture(scope="session")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def private_pem(rsa_key) -> str:
    return rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.fixture
def drive(rsa_key):
    fake = FakeDrive(page_size=2).start()
    fake.add_account(EMAIL, rsa_key.public_key())
    yield fake
    fake.stop()


@pytest.fixture
def key_file(tmp_path, drive, private_pem) -> Path:
    path = tmp_path / "google_credentials.json"
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "tp-test",
                "private_key_id": "0123456789abcdef",
                "private_key": private_pem,
                "client_email": EMAIL,
                "client_id": "1234567890",
                "token_uri": drive.token_uri,
            }
        )
    )
    return path


@pytest.fixture
def folder(drive) -> str:
    return drive.add_folder("transactions inbox")


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch) -> None:
    """The product's policy, started at 10 ms instead of 0.5 s so that a test with several faults is quick."""
    monkeypatch.setattr(retry, "INITIAL_DELAY", 0.01)


@pytest.fixture
def make_source(make_settings, drive, key_file, folder):
    from src.utils.db import Database

    made: list[tuple[GoogleDriveSource, Database]] = []
    dbs: list[Database] = []

    def make(*, folder_id: str | None = None, db=None, **kwargs) -> GoogleDriveSource:
        settings = make_settings(
            GDRIVE_FOLDER_ID=folder_id or folder,
            GOOGLE_CREDENTIALS_PATH=str(key_file),
            GDRIVE_API_ENDPOINT=drive.api_endpoint,
        )
        if db is None:
            db = dbs[0] if dbs else Database(settings)
            if not dbs:
                db.apply_schema()
                dbs.append(db)
        kwargs.setdefault("chunk_size", CHUNK)
        kwargs.setdefault("timeout", 10.0)
        source = GoogleDriveSource(settings, db, **kwargs)
        made.append((source, db))
        return source

    yield make
    for source, _ in made:
        source.close()
    for db in dbs:
        db.close()


def csv_bytes(rows: int, tag: str = "") -> bytes:
    head = "step,customer,age,gender,zipcodeOri,merchant,zipMerchant,category,amount,fraud\n"
    body = "".join(
        f"{i},'C{i}{tag}','4','M','28007','M348934600','28007','es_transportation',{i % 97}.5,0\n" for i in range(rows)
    )
    return (head + body).encode()


def by_id(files) -> dict:
    return {f.file_id: f for f in files}


def test_first_poll_lists_folder_in_pages_and_persists_token(drive, folder, make_source, pg_conn):
    a = drive.add_file("a.csv", csv_bytes(3), folder)
    b = drive.add_file("B.CSV", csv_bytes(4), folder, mime_type="application/octet-stream")
    c = drive.add_file("no-extension", csv_bytes(2), folder)  # text/csv by type
    weird = drive.add_file("../x/é 'quoted' \"name\".csv", csv_bytes(1), folder)
    drive.add_file("notes.txt", b"hello", folder, mime_type="text/plain")
    sub = drive.add_folder("archive", parent=folder)
    drive.add_file("old.csv", csv_bytes(1), sub)
    trashed = drive.add_file("trashed.csv", csv_bytes(1), folder)
    drive.trash_file(trashed)
    drive.add_file("elsewhere.csv", csv_bytes(1), drive.add_folder("other"))

    source = make_source()
    files = by_id(source.list_files())

    assert set(files) == {a, b, c, weird}
    fa = files[a]
    assert fa.name == "a.csv" and fa.size == len(csv_bytes(3)) and fa.checksum == hashlib.md5(csv_bytes(3)).hexdigest()
    assert fa.modified_time.tzinfo is not None and fa.modified_time.utcoffset() == UTC.utcoffset(None)
    assert files[b].mime_type == "application/octet-stream"

    lists = drive.of("files.list")
    assert len(lists) == 3  # 6 children (4 CSVs, a .txt, a subfolder), 2 per page
    assert all(r.query["q"] == f"'{folder}' in parents and trashed = false" for r in lists)
    assert [bool(r.query.get("pageToken")) for r in lists] == [False] + [True] * (len(lists) - 1)
    spec = parse_fields(lists[0].query["fields"])
    assert set(spec) == {"nextPageToken", "files"}
    assert set(spec["files"]) == {"id", "name", "mimeType", "md5Checksum", "size", "modifiedTime"}

    ops = [r.op for r in drive.requests]
    assert ops.index("changes.getStartPageToken") < ops.index("files.list"), "start token must precede listing"
    assert drive.granted_scopes and all(
        s == "https://www.googleapis.com/auth/drive.readonly" for s in drive.granted_scopes
    )

    with pg_conn.cursor() as cur:
        cur.execute("SELECT key, value FROM kv_state")
        rows = cur.fetchall()
    assert len(rows) == 1 and folder in rows[0][0] and EMAIL in rows[0][0]
    assert rows[0][1] == drive.start_token()[1]["startPageToken"]


def test_later_polls_use_changes_only(drive, folder, make_source, pg_conn):
    keep = drive.add_file("keep.csv", csv_bytes(2), folder)
    modify = drive.add_file("modify.csv", csv_bytes(2), folder)
    trash = drive.add_file("trash.csv", csv_bytes(2), folder)
    delete = drive.add_file("delete.csv", csv_bytes(2), folder)
    move = drive.add_file("move.csv", csv_bytes(2), folder)
    sub = drive.add_folder("sub", parent=folder)

    source = make_source()
    first = by_id(source.list_files())
    assert set(first) == {keep, modify, trash, delete, move}
    lists_before = drive.count("files.list")

    added = drive.add_file("added.csv", csv_bytes(5), folder)
    drive.update_file(modify, csv_bytes(9, tag="v2"))
    drive.trash_file(trash)
    drive.delete_file(delete)
    drive.update_file(move, parents=[sub])
    drive.add_file("in-sub.csv", csv_bytes(1), sub)
    drive.add_file("unrelated.csv", csv_bytes(1), drive.add_folder("other"))
    for i in range(4):  # several pages of changes (page size 2)
        drive.update_file(keep, name="keep.csv") if i == 0 else drive.add_file(
            f"x{i}.txt", b"x", folder, mime_type="text/plain"
        )

    second = by_id(source.list_files())
    assert drive.count("files.list") == lists_before, "a later poll must not list the folder again"
    assert drive.count("changes.list") >= 3
    assert set(second) == {keep, modify, added}
    assert second[modify].checksum == hashlib.md5(csv_bytes(9, tag="v2")).hexdigest() != first[modify].checksum
    assert second[modify].size == len(csv_bytes(9, tag="v2"))
    assert second[added].name == "added.csv"
    spec = parse_fields(drive.of("changes.list")[-1].query["fields"])
    assert "parents" in spec["changes"]["file"] and "trashed" in spec["changes"]["file"]

    third = by_id(source.list_files())  # nothing changed: one cheap call
    assert third == second
    with pg_conn.cursor() as cur:
        cur.execute("SELECT value FROM kv_state")
        assert cur.fetchone()[0] == drive.start_token()[1]["startPageToken"]


def test_restart_resumes_from_persisted_token(drive, folder, make_source):
    one = drive.add_file("one.csv", csv_bytes(1), folder)
    first = make_source()
    assert set(by_id(first.list_files())) == {one}
    first.close()

    two = drive.add_file("two.csv", csv_bytes(1), folder)
    drive.update_file(one, csv_bytes(3))
    starts = drive.count("changes.getStartPageToken")
    changes_before = drive.count("changes.list")

    second = make_source()
    files = by_id(second.list_files())
    assert set(files) == {one, two}
    assert files[one].checksum == hashlib.md5(csv_bytes(3)).hexdigest()
    assert drive.count("changes.getStartPageToken") == starts, "the saved token is used, not a new one"
    assert drive.count("changes.list") > changes_before


def test_stale_token_falls_back_to_full_listing(drive, folder, make_source, pg_conn):
    one = drive.add_file("one.csv", csv_bytes(1), folder)
    source = make_source()
    key = source.token_key
    with pg_conn.cursor() as cur:
        cur.execute("INSERT INTO kv_state (key, value) VALUES (%s, %s)", (key, "bogus"))
    assert set(by_id(source.list_files())) == {one}
    with pg_conn.cursor() as cur:
        cur.execute("SELECT value FROM kv_state WHERE key = %s", (key,))
        assert cur.fetchone()[0] != "bogus"


def test_fetch_streams_to_temp_file_named_by_id(drive, folder, make_source, tmp_path):
    data = csv_bytes(20_000)  # ~1.2 MB, several chunks
    fid = drive.add_file("../../etc/passwd 'x' ü.csv", data, folder)
    source = make_source()
    (f,) = source.list_files()
    with source.fetch(f) as path:
        assert path.read_bytes() == data
        assert path.parent == tmp_path / "data" / "downloads"
        assert "passwd" not in path.name and fid in path.name
    assert not path.exists()
    ranges = [r.headers.get("range") for r in drive.of("media")]
    assert ranges[0] == f"bytes=0-{CHUNK - 1}" and len(ranges) == -(-len(data) // CHUNK)
    assert all(r.path.startswith("/drive/v3/files/") for r in drive.of("media"))


def test_fetch_removes_temp_file_when_caller_fails(drive, folder, make_source):
    drive.add_file("a.csv", csv_bytes(5), folder)
    source = make_source()
    (f,) = source.list_files()
    with pytest.raises(RuntimeError), source.fetch(f) as path:
        raise RuntimeError("caller failed")
    assert not path.exists()


def test_sheet_is_exported_as_csv_once_per_version(drive, folder, make_source):
    text = "step,customer\n1,'C1'\n"
    sid = drive.add_sheet("Importance sheet", text, folder)
    source = make_source()
    (f,) = source.list_files()
    assert f.file_id == sid and f.mime_type == gdrive_source.SHEET_MIME
    assert f.checksum == hashlib.md5(text.encode()).hexdigest() and f.size == len(text)
    with source.fetch(f) as path:
        assert path.read_text() == text
    assert [r.query["mimeType"] for r in drive.of("export")] == ["text/csv", "text/csv"]

    assert source.list_files() == [f]  # unchanged: no new export
    assert drive.count("export") == 2
    drive.content[sid] = (text + "2,'C2'\n").encode()
    drive.update_file(sid)
    (g,) = source.list_files()
    assert g.checksum == hashlib.md5((text + "2,'C2'\n").encode()).hexdigest()
    assert drive.count("export") == 3


def test_sheet_too_large_to_export_fails_with_reason(drive, folder, make_source):
    drive.export_limit = 10
    drive.add_sheet("Big sheet", "step,customer\n1,'C1'\n", folder)
    source = make_source()
    (f,) = source.list_files()
    assert f.checksum is None
    exports = drive.count("export")
    with pytest.raises(DownloadFailed, match="10 MB CSV export limit"), source.fetch(f):
        pass
    assert drive.count("export") == exports, "the failure of this version is remembered"


def test_md5_mismatch_is_retried_then_fails_with_reason(drive, folder, make_source):
    good = drive.add_file("good.csv", csv_bytes(10), folder)
    bad = drive.add_file("bad.csv", csv_bytes(10), folder)
    drive.inject_fault("media", "corrupt", times=1, file_id=good)
    drive.inject_fault("media", "corrupt", times=100, file_id=bad)
    source = make_source()
    files = by_id(source.list_files())

    with source.fetch(files[good]) as path:  # one corrupted download, then a good one
        assert path.read_bytes() == csv_bytes(10)
    assert drive.count("media", good) == 2

    with pytest.raises(DownloadFailed, match="md5 mismatch") as err, source.fetch(files[bad]):
        pass
    assert files[bad].checksum in str(err.value) and bad in str(err.value)
    assert drive.count("media", bad) == MD5_ATTEMPTS
    assert not list((source.downloads).glob("*"))


@pytest.mark.parametrize("kind", [429, 500, 503, "403rate", "timeout"])
def test_transient_faults_on_list_changes_and_media_are_retried(drive, folder, make_source, caplog, kind):
    data = csv_bytes(8000)
    fid = drive.add_file("a.csv", data, folder)
    # A "timeout" stalls far past the client's 2 s timeout (and is cut short when the fake stops).
    drive.inject_fault("files.list", kind, times=2, delay=60)
    source = make_source(timeout=2.0 if kind == "timeout" else 10.0)
    caplog.set_level(logging.WARNING, logger=retry.__name__)
    assert set(by_id(source.list_files())) == {fid}

    data += b"1,'C1','4','M','28007','M1','28007','es_food',1.0,0\n"
    drive.update_file(fid, data)
    drive.inject_fault("changes.list", kind, times=2, delay=60)
    (f,) = source.list_files()
    assert f.size == len(data)

    drive.inject_fault("media", kind, times=2, skip=1, delay=60)  # fail the second chunk twice
    with source.fetch(f) as path:
        assert hashlib.md5(path.read_bytes()).hexdigest() == f.checksum
    lines = wait_lines(caplog)
    for what in ("files.list", "changes.list", f"download of {fid}"):
        waits = [x for x in lines if f"({what})" in x]
        # Exactly one wait per injected fault; a loaded machine may add a stray timeout, never remove one.
        assert len(waits) == 2 if kind != "timeout" else len(waits) >= 2, (what, lines)
    assert all(drive.api_endpoint in x for x in lines)
    ranges = [r.headers["range"] for r in drive.of("media")]
    assert ranges[0] == f"bytes=0-{CHUNK - 1}" and ranges.count(f"bytes=0-{CHUNK - 1}") == 1  # resumed, not restarted


def test_retry_after_is_honoured(drive, folder, make_source, caplog):
    fid = drive.add_file("a.csv", csv_bytes(3), folder)
    drive.inject_fault("files.list", 429, times=1, retry_after=1.5)
    caplog.set_level(logging.WARNING, logger=retry.__name__)
    source = make_source()
    assert set(by_id(source.list_files())) == {fid}
    (line,) = wait_lines(caplog)
    assert "(files.list)" in line and line.endswith("next in 1.5 s")


def test_broken_download_resumes_at_first_missing_byte(drive, folder, make_source):
    data = csv_bytes(12_000)
    drive.add_file("a.csv", data, folder)
    drive.inject_fault("media", "truncate", times=1, skip=1)
    source = make_source()
    (f,) = source.list_files()
    with source.fetch(f) as path:
        assert path.read_bytes() == data
    ranges = [r.headers["range"] for r in drive.of("media")]
    assert ranges[:3] == [f"bytes=0-{CHUNK - 1}", f"bytes={CHUNK}-{2 * CHUNK - 1}", f"bytes={CHUNK}-{2 * CHUNK - 1}"]
    assert ranges.count(f"bytes=0-{CHUNK - 1}") == 1


def test_an_outage_only_delays_a_download_and_404_still_fails(drive, folder, make_source, caplog):
    data = csv_bytes(12_000)  # several Range chunks
    slow = drive.add_file("slow.csv", data, folder)
    good = drive.add_file("good.csv", csv_bytes(10), folder)
    source = make_source()
    files = by_id(source.list_files())
    drive.inject_fault("media", 503, times=10_000, skip=1, file_id=slow)  # down after the first chunk

    def fetch() -> bytes:
        with source.fetch(files[slow]) as path:
            return path.read_bytes()

    worker, out = in_thread(fetch)
    until(lambda: drive.count("media", slow) >= 8, "eight download attempts")
    assert worker.is_alive() and not out  # waiting, not failed
    drive.clear_faults()  # Drive is back
    worker.join(DEADLINE)
    assert out == [data]
    ranges = [r.headers["range"] for r in drive.of("media") if r.file_id == slow]
    assert ranges.count(f"bytes=0-{CHUNK - 1}") == 1  # the bytes already received were kept
    assert len(wait_lines(caplog)) >= 7

    drive.delete_file(good)
    with pytest.raises(DownloadFailed, match="gone"), source.fetch(files[good]):
        pass
    assert set(by_id(source.list_files())) == {slow}


def test_sheet_export_waits_out_an_outage(drive, folder, make_source):
    text = "step,customer\n1,'C1'\n"
    sid = drive.add_sheet("Importance sheet", text, folder)
    drive.inject_fault("export", 503, times=5)
    source = make_source()
    (f,) = source.list_files()  # the export while listing waited: the version is not marked failed
    assert f.file_id == sid and f.checksum == hashlib.md5(text.encode()).hexdigest()
    with source.fetch(f) as path:
        assert path.read_text() == text


def test_stop_ends_a_wait_with_retryable_error(drive, folder, make_source):
    drive.inject_fault("files.list", 503, times=10_000)
    stop = threading.Event()
    source = make_source(stop=stop)
    worker, out = in_thread(source.list_files)
    until(lambda: drive.count("files.list") >= 3, "three listing attempts")
    assert worker.is_alive()
    stop.set()
    worker.join(DEADLINE)
    (err,) = out
    assert isinstance(err, RetryableError) and "files.list not done" in str(err) and "\n" not in str(err)


def test_parallel_fetches_use_one_client_per_thread(drive, folder, make_source):
    contents = {
        drive.add_file(f"f{i}.csv", csv_bytes(3000, tag=str(i)), folder): csv_bytes(3000, tag=str(i)) for i in range(6)
    }
    source = make_source()
    files = source.list_files()

    def read(f):
        with source.fetch(f) as path:
            return f.file_id, path.read_bytes()

    with ThreadPoolExecutor(max_workers=4) as pool:
        got = dict(pool.map(read, files))
    assert got == contents


def test_large_file_downloads_in_chunks_with_bounded_memory(drive, folder, make_source):
    size = 30 * 1024 * 1024
    data = (b"0,'C1','4','M','28007','M348934600','28007','es_transportation',12.5,0\n" * (size // 70 + 1))[:size]
    drive.add_file("big.csv", data, folder)
    md5 = hashlib.md5(data).hexdigest()
    chunk = 1024 * 1024
    source = make_source(chunk_size=chunk, timeout=10)
    (f,) = source.list_files()
    tracemalloc.start()
    try:
        with source.fetch(f) as path:
            _, peak = tracemalloc.get_traced_memory()
            assert path.stat().st_size == size
            digest = hashlib.md5()
            with open(path, "rb") as fh:
                while block := fh.read(1 << 20):
                    digest.update(block)
    finally:
        tracemalloc.stop()
    assert digest.hexdigest() == md5
    assert drive.count("media") == size // chunk
    assert peak < 4 * chunk, f"peak traced memory {peak / 2**20:.1f} MiB for a 30 MiB file"


# -- start-up checks ---------------------------------------------------------------------------


def test_check_passes_and_uses_the_configured_endpoint(drive, make_source, caplog, private_pem):
    caplog.set_level(logging.DEBUG)
    source = make_source()
    source.check()
    (token,) = drive.tokens
    assert token not in caplog.text and private_pem.splitlines()[1] not in caplog.text
    assert drive.of("files.get") and drive.count("token") == 1
    # The account is named once, when the folder is checked; describe() lands in the lake: no identity there.
    assert EMAIL not in source.describe() and drive.api_endpoint in source.describe()
    assert len([r for r in caplog.records if r.name.startswith("src.") and EMAIL in r.getMessage()]) == 1
    assert DEFAULT_API_ENDPOINT == "https://www.googleapis.com/drive/v3/"


def test_missing_key_file_is_refused_by_settings_and_by_check(make_settings, make_source, key_file, tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(SettingsError, match="GOOGLE_CREDENTIALS_PATH=.*nope.json does not exist"):
        make_settings(GDRIVE_FOLDER_ID="abc", GOOGLE_CREDENTIALS_PATH=str(missing))
    source = make_source()
    key_file.unlink()
    with pytest.raises(SettingsError, match=r"GOOGLE_CREDENTIALS_PATH=.*google_credentials.json does not exist"):
        source.check()


def test_key_that_is_not_json(make_source, key_file):
    key_file.write_text("-----BEGIN PRIVATE KEY-----\nMIIEv...\n")
    with pytest.raises(SettingsError) as err:
        make_source().check()
    message = str(err.value)
    assert "is not a JSON key file" in message and str(key_file) in message and "MIIE" not in message
    assert "\n" not in message


def test_key_of_wrong_type(make_source, key_file):
    key_file.write_text(json.dumps({"type": "authorized_user", "client_id": "x", "refresh_token": "secret-rt"}))
    with pytest.raises(SettingsError, match="type 'authorized_user', not 'service_account'") as err:
        make_source().check()
    assert "secret-rt" not in str(err.value)


def test_folder_not_shared_names_client_email(make_source):
    with pytest.raises(SourceError, match=f"not shared with {EMAIL}: share the folder with {EMAIL}"):
        make_source(folder_id="1NotSharedFolder").check()


def test_folder_id_of_a_file(drive, folder, make_source):
    fid = drive.add_file("a.csv", b"x", folder)
    with pytest.raises(SourceError, match="is a file .* not a folder"):
        make_source(folder_id=fid).check()


def test_key_refused_by_token_service(drive, make_source, rsa_key, private_pem, caplog):
    drive.accounts[EMAIL] = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SettingsError, match=f"refused the key of {EMAIL}.*invalid_grant") as err:
        make_source().check()
    secret_line = private_pem.splitlines()[1]
    assert secret_line not in str(err.value) and secret_line not in caplog.text
    assert "BEGIN PRIVATE KEY" not in caplog.text


def test_list_files_checks_the_folder_first(make_source):
    with pytest.raises(SourceError, match="share the folder"):
        make_source(folder_id="1Missing").list_files()

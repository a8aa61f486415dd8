"""File leases: which Mechanism X works on which source file when several daemons share one database.

An X claims a file before it touches it (`claim`), and gives it back when it is done with it (`release`).
While it holds leases a thread renews them every X_LEASE_RENEW_SECONDS on a connection of its own: the
ingest loop's connection is busy for seconds at a time (an importance load, waiting for Mechanism Y). The
ledger statements that move a file on are fenced by the lease (`fence`), so an X that lost a lease can no
longer record anything for that file; see `src/ledger.py` for when a lease is free.
"""

from __future__ import annotations

import logging
import threading

import psycopg2.extensions

from config.config import Settings
from src import ledger
from src.errors import is_retryable
from src.utils.db import Database
from src.utils.retry import brief

log = logging.getLogger(__name__)
# A lease lasts X_LEASE_SECONDS past its last renewal; a holder that stops renewing (hung, cut off) loses its
# files after it. A holder that dies loses them at once: its renewing session ends with it (see
# ledger._LEASE_FREE).


class LeaseKeeper:
    """The leases of one X process: claimed and released by its loop, renewed by a thread once started."""

    def __init__(self, settings: Settings, db: Database, stop: threading.Event, holder: str | None = None) -> None:
        self.settings = settings
        self.db = db
        self.stop = stop
        self.holder = holder or ledger.holder_id()
        self.seconds = settings.x_lease_seconds
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._renew_db: Database | None = None
        self._pid: int | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    def claim(self, file_id: str) -> ledger.Claim:
        """Lease `file_id` to this X unless another live X holds it."""
        claim = ledger.claim_file(self.db, file_id, self.holder, seconds=self.seconds, pid=self._pid)
        if claim.got:
            with self._lock:
                self._held.add(file_id)
            if claim.taken_over_from:
                log.warning(
                    "file %s taken over from %s, which stopped renewing its lease; resuming at its recorded offset",
                    file_id,
                    claim.taken_over_from,
                    extra={"event": "lease_taken_over", "file_id": file_id},
                )
        return claim

    def fence(self, cur: psycopg2.extensions.cursor, file_id: str) -> None:
        """In the caller's transaction: LeaseLost unless this X still holds `file_id`."""
        ledger.fence_file(cur, file_id, self.holder, seconds=self.seconds)

    def hold(self, cur: psycopg2.extensions.cursor, file_id: str) -> None:
        """`fence` for a transaction on another connection of this X, beside its fenced ones (see ledger.hold_file)."""
        ledger.hold_file(cur, file_id, self.holder)

    def release(self, file_id: str) -> None:
        with self._lock:
            self._held.discard(file_id)
        ledger.release_file(self.db, file_id, self.holder)

    # ------------------------------------------------------------ renewal

    def start(self) -> None:
        """Renew the held leases every X_LEASE_RENEW_SECONDS until `close` (or the stop flag)."""
        if self._thread is not None:
            return
        self._renew_db = Database(self.settings, stop=self._closing)
        # Claims name this session as the one that renews: the leases die with this process, not later. Its
        # server pid is noted at every (re)connection, so claims made after a reconnect name the new session.
        self._renew_db.on_connect(self._note_pid)
        self._renew_db.conn  # noqa: B018 - connect now: the first claims need the pid
        self._thread = threading.Thread(target=self._renew_loop, name="x-leases", daemon=True)
        self._thread.start()

    def _note_pid(self, conn: psycopg2.extensions.connection) -> None:
        self._pid = conn.get_backend_pid()

    def _renew_loop(self) -> None:
        while not self._closing.wait(self.settings.x_lease_renew_seconds):
            try:
                self.renew_once()
            except Exception as exc:  # noqa: BLE001 - the loop's own fences catch what a missed renewal risks
                if not is_retryable(exc) and not self._closing.is_set():
                    log.exception("renewing the file leases failed", extra={"event": "lease_renew_failed"})
                else:
                    log.warning(
                        "renewing the file leases failed: %s", brief(exc), extra={"event": "lease_renew_failed"}
                    )

    def renew_once(self) -> None:
        """One renewal; logs a lease found taken over (the loop's next fenced statement stops that file)."""
        db = self._renew_db or self.db
        with self._lock:
            held = set(self._held)
        kept = ledger.renew_leases(db, self.holder, seconds=self.seconds) if held else set()
        for file_id in held - kept:
            with self._lock:
                still = file_id in self._held
            if still:
                log.warning(
                    "the lease on file %s was taken over by another Mechanism X; this one stops work on it",
                    file_id,
                    extra={"event": "lease_lost", "file_id": file_id},
                )

    def close(self) -> None:
        """Stop renewing and give back what is still held (on a clean stop another X need not wait)."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            held, self._held = self._held, set()
        for file_id in held:
            try:
                ledger.release_file(self.db, file_id, self.holder)
            except Exception as exc:  # noqa: BLE001 - the lease then expires by itself
                log.warning("could not release the lease on file %s: %s", file_id, brief(exc))
        if self._renew_db is not None:
            self._renew_db.close()

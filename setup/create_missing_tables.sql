-- Ledger and state tables the design needs beside SPEC §3's. Idempotent, applied at start.

-- One row per file seen in the source.
CREATE TABLE IF NOT EXISTS source_files (
    file_id         TEXT        PRIMARY KEY,      -- local-<sha256(name)> or the Drive id
    source          TEXT        NOT NULL,         -- local | gdrive
    name            TEXT        NOT NULL,
    kind            TEXT        NOT NULL,         -- transactions | importance | ignored | unknown
    status          TEXT        NOT NULL,         -- ingesting | done | failed | ignored | conflict | deleted
    checksum        TEXT,                         -- md5 of the content last ingested
    size_bytes      BIGINT,
    modified_time   TIMESTAMPTZ,
    lines_done      BIGINT      NOT NULL DEFAULT 0,   -- data rows consumed (good + quarantined)
    next_line       BIGINT      NOT NULL DEFAULT 2,   -- line number at bytes_done (the header is line 1)
    bytes_done      BIGINT      NOT NULL DEFAULT 0,   -- byte offset after the last consumed line
    prefix_md5      TEXT,                         -- md5 of bytes [0, bytes_done)
    rows_ingested   BIGINT      NOT NULL DEFAULT 0,
    rows_quarantined BIGINT     NOT NULL DEFAULT 0,
    chunks          INTEGER     NOT NULL DEFAULT 0,
    reason          TEXT,
    conflict_checksum TEXT,
    first_seen      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at     TIMESTAMPTZ
);

-- One row per chunk. `seq` is the global order Mechanism Y follows.
CREATE TABLE IF NOT EXISTS chunks (
    seq             BIGSERIAL   PRIMARY KEY,
    file_id         TEXT        NOT NULL REFERENCES source_files (file_id),
    chunk_seq       INTEGER     NOT NULL,
    first_line      BIGINT      NOT NULL,
    last_line       BIGINT      NOT NULL,
    rows_total      INTEGER     NOT NULL,          -- data rows in the range
    rows_valid      INTEGER     NOT NULL,          -- rows in the object
    rows_quarantined INTEGER    NOT NULL,
    bytes_start     BIGINT      NOT NULL,
    bytes_end       BIGINT      NOT NULL,
    prefix_md5      TEXT        NOT NULL,
    object_key      TEXT        NOT NULL UNIQUE,
    content_md5     TEXT,
    ingest_date     DATE        NOT NULL,          -- UTC date in the object key
    status          TEXT        NOT NULL,          -- pending | written | failed
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    written_at      TIMESTAMPTZ,
    processed_at    TIMESTAMPTZ,                   -- set by Mechanism Y in the same transaction as its state
    y_rows_clean    INTEGER,
    y_rows_rejected INTEGER,
    y_new_detections INTEGER,
    UNIQUE (file_id, chunk_seq)
);
CREATE INDEX IF NOT EXISTS chunks_unprocessed_idx ON chunks (seq) WHERE processed_at IS NULL;
CREATE INDEX IF NOT EXISTS chunks_pending_idx ON chunks (seq) WHERE status = 'pending';

-- Rows that failed validation, with where they came from and why.
CREATE TABLE IF NOT EXISTS quarantine (
    file_id     TEXT        NOT NULL,
    line_no     BIGINT      NOT NULL,
    chunk_seq   INTEGER,
    stage       TEXT        NOT NULL DEFAULT 'ingest',   -- ingest (X) | detect (Y)
    reason      TEXT        NOT NULL,
    raw_line    TEXT,
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (file_id, line_no, stage)
);

-- Which importance file is loaded; Mechanism Y reloads its weights when `version` changes.
CREATE TABLE IF NOT EXISTS importance_state (
    id          SMALLINT    PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    file_id     TEXT        NOT NULL,
    checksum    TEXT        NOT NULL,
    rows_loaded BIGINT      NOT NULL,
    version     BIGINT      NOT NULL,
    loaded_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Mechanism Y's running state per (merchant, customer).
CREATE TABLE IF NOT EXISTS y_state (
    merchant    TEXT          NOT NULL,
    customer    TEXT          NOT NULL,
    n           BIGINT        NOT NULL,
    amount_sum  NUMERIC(38,2) NOT NULL,
    has_f       BOOLEAN       NOT NULL,
    has_m       BOOLEAN       NOT NULL,
    PRIMARY KEY (merchant, customer)
) WITH (fillfactor = 50);
-- Added 2026-12-02 (issue 12, Y's commit): every commit updates a large share of the pairs (a 10,000-row chunk of
-- the 594,643-row sample touches ~7,600 of ~19,800). Half of each page left free lets the new version of a row stay
-- on its page (a HOT update: no new entry in the primary key): over 60 one-chunk commits every update was HOT
-- (84 % at fill factor 100) and the commits took ~7 % less CPU (bench/README.md, "ycommit"); the table is twice
-- as large (a few MiB). An existing y_state gets the setting (only then: ALTER TABLE takes a
-- lock); its pages fill to half as their rows move.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_class WHERE oid = 'y_state'::regclass
                   AND 'fillfactor=50' = ANY (coalesce(reloptions, '{}'))) THEN
        ALTER TABLE y_state SET (fillfactor = 50);
    END IF;
END
$$;

-- Lake files of detections: assigned in PostgreSQL first, then written under the same name.
CREATE TABLE IF NOT EXISTS detection_files (
    object_key  TEXT        PRIMARY KEY,
    pattern_id  TEXT        NOT NULL,
    rows        INTEGER     NOT NULL,
    written     BOOLEAN     NOT NULL DEFAULT false,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Small key/value state: Drive change tokens and the like.
CREATE TABLE IF NOT EXISTS kv_state (
    key         TEXT        PRIMARY KEY,
    value       TEXT        NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Added 2026-12-02 (reliability): attempts per file and per chunk, the last error, and the batch that
-- processed a chunk (so a commit redone after a lost acknowledgement is recognised, not counted twice).
ALTER TABLE source_files ADD COLUMN IF NOT EXISTS attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE source_files ADD COLUMN IF NOT EXISTS last_error TEXT;
ALTER TABLE chunks ADD COLUMN IF NOT EXISTS attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE chunks ADD COLUMN IF NOT EXISTS last_error TEXT;
ALTER TABLE chunks ADD COLUMN IF NOT EXISTS y_batch_id TEXT;
CREATE INDEX IF NOT EXISTS chunks_batch_idx ON chunks (y_batch_id) WHERE y_batch_id IS NOT NULL;

-- Added 2026-12-02 (issue 11, two daemons on one database): each source file is leased to one Mechanism X at a
-- time. The holder renews `expires_at` while it works; a lease whose holder stopped renewing (or whose renewing
-- session is gone from the server) may be taken over, and the new holder resumes at the file's recorded offset.
CREATE TABLE IF NOT EXISTS file_leases (
    file_id     TEXT        PRIMARY KEY,          -- source_files.file_id (the row may not exist yet: a new file)
    holder      TEXT,                             -- host:pid:token of the X holding it; NULL when free
    holder_pid  INTEGER,                          -- the server pid of the holder's renewing session
    expires_at  TIMESTAMPTZ,                      -- the database's clock, never the holder's
    taken_at    TIMESTAMPTZ,
    takeovers   INTEGER     NOT NULL DEFAULT 0    -- times the lease was taken from a holder that stopped renewing
);
-- Which Mechanism Y leads (it also holds the advisory lock): a leader that lost its connection checks here, on
-- reconnecting, that nobody led in between, before it goes on from its in-memory state.
CREATE TABLE IF NOT EXISTS leaders (
    role        TEXT        PRIMARY KEY,          -- mechanism_y
    holder      TEXT        NOT NULL,
    term        BIGINT      NOT NULL,             -- +1 at every change of leader
    since       TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Added 2026-12-02 (issues 11 and 12): each chunk's rows, staged by Mechanism X after it records the chunk and
-- before it marks it written, under the chunk's ledger `seq` (filled, with the chunk's file and chunk_seq, from
-- `tp.staged_*`, which ledger.stage_rows sets: the COPY carries only what differs from row to row). Mechanism Y's commit moves them into `transactions` (minus the rows it rejects) and folds them into
-- `y_state` in PostgreSQL, so a batch's rows never travel through Y's driver. Cheap for X on purpose:
-- UNLOGGED (no WAL; a server crash empties the table, and a replica never has it) and one index, on `seq`
-- alone (a chunk's rows share one key, which a B-tree stores once). Nothing depends on the staging being there: Y checks each chunk's staged rows
-- against what it read from the chunk's object, and without them (or when they differ) it loads the rows
-- from the object through its driver, as before the staging. Columns are nullable: staging never refuses
-- a chunk; what `transactions` would refuse, Y rejects first.
CREATE UNLOGGED TABLE IF NOT EXISTS staged_rows (
    seq             BIGINT        NOT NULL DEFAULT current_setting('tp.staged_seq')::bigint,
    source_file_id  TEXT          DEFAULT current_setting('tp.staged_file'),
    source_line     BIGINT,
    chunk_seq       INTEGER       DEFAULT current_setting('tp.staged_chunk')::integer,
    step            INTEGER,
    customer        TEXT,
    age             TEXT,
    gender          TEXT,
    zipcode_ori     TEXT,
    merchant        TEXT,
    zip_merchant    TEXT,
    category        TEXT,
    amount          NUMERIC(18,2),
    fraud           SMALLINT
);
CREATE INDEX IF NOT EXISTS staged_rows_seq_idx ON staged_rows (seq);
-- A staged_rows created before the lineage defaults gets them (only then: ALTER TABLE locks the table).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
                   WHERE d.adrelid = 'staged_rows'::regclass AND a.attname = 'chunk_seq') THEN
        ALTER TABLE staged_rows
            ALTER COLUMN source_file_id SET DEFAULT current_setting('tp.staged_file'),
            ALTER COLUMN chunk_seq SET DEFAULT current_setting('tp.staged_chunk')::integer;
    END IF;
END
$$;

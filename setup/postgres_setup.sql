-- Tables of SPEC §3. Idempotent: safe to apply on every start and by hand:
--   python main.py psql   (from the project root), then: \i setup/postgres_setup.sql

CREATE TABLE IF NOT EXISTS transactions (
    source_file_id  TEXT          NOT NULL,
    source_line     BIGINT        NOT NULL,
    chunk_seq       INTEGER       NOT NULL,
    step            INTEGER       NOT NULL,
    customer        TEXT          NOT NULL,
    age             TEXT,
    gender          TEXT          NOT NULL,
    zipcode_ori     TEXT,
    merchant        TEXT          NOT NULL,
    zip_merchant    TEXT,
    category        TEXT,
    amount          NUMERIC(18,2) NOT NULL,
    fraud           SMALLINT      NOT NULL,
    PRIMARY KEY (source_file_id, source_line)
);
CREATE INDEX IF NOT EXISTS transactions_merchant_idx ON transactions (merchant);
CREATE INDEX IF NOT EXISTS transactions_customer_idx ON transactions (customer);

CREATE TABLE IF NOT EXISTS customer_importance (
    source      TEXT          NOT NULL,   -- customer
    target      TEXT          NOT NULL,   -- merchant
    weight      NUMERIC(18,2) NOT NULL,
    type_trans  TEXT,
    fraud       SMALLINT
);
CREATE INDEX IF NOT EXISTS customer_importance_pair_idx ON customer_importance (source, target);

CREATE TABLE IF NOT EXISTS pattern_detections (
    id              BIGSERIAL   PRIMARY KEY,
    pattern_id      TEXT        NOT NULL,
    action_type     TEXT        NOT NULL,
    customer_name   TEXT        NOT NULL,
    merchant_id     TEXT        NOT NULL,
    y_start_time    TIMESTAMPTZ NOT NULL,
    detection_time  TIMESTAMPTZ NOT NULL,
    chunk_id        BIGINT      NOT NULL,
    lake_file       TEXT,
    CONSTRAINT pattern_detections_key UNIQUE (pattern_id, customer_name, merchant_id)
);
CREATE INDEX IF NOT EXISTS pattern_detections_unfiled_idx ON pattern_detections (pattern_id, id) WHERE lake_file IS NULL;

CREATE TABLE IF NOT EXISTS processing_logs (
    id          BIGSERIAL   PRIMARY KEY,
    logged_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    component   TEXT        NOT NULL,          -- mechanism_x | mechanism_y | supervisor
    level       TEXT        NOT NULL,          -- INFO | WARNING | ERROR
    event       TEXT        NOT NULL,          -- file_ingested, rows_quarantined, file_conflict, ...
    file_id     TEXT,
    chunk_id    BIGINT,
    row_count   BIGINT,
    message     TEXT        NOT NULL
);
CREATE INDEX IF NOT EXISTS processing_logs_event_idx ON processing_logs (event);

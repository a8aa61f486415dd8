"""Typed settings, built once from the environment (and `.env`) and validated at start.

Every variable of SPEC §6 is a field here and a line in `.env.template`; a test keeps the two
in step. A bad value raises `SettingsError` whose message is one line naming the variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from src.errors import SettingsError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Secret:
    """A string that never shows itself in repr, str or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _str(name: str, raw: str) -> str:
    return raw.strip()


def _opt_str(name: str, raw: str) -> str | None:
    value = raw.strip()
    return value or None


def _int(minimum: int, maximum: int | None = None) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise SettingsError(f"{name}={value} is out of range: it must be {bound}")
        return value

    return parse


def _float(minimum: float, maximum: float | None = None, *, exclusive_min: bool = False) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise SettingsError(f"{name}={raw!r} is not a finite number")
        too_low = value <= minimum if exclusive_min else value < minimum
        if too_low or (maximum is not None and value > maximum):
            lo = f"> {minimum}" if exclusive_min else f">= {minimum}"
            bound = lo if maximum is None else f"{lo} and <= {maximum}"
            raise SettingsError(f"{name}={raw.strip()} is out of range: it must be {bound}")
        return value

    return parse


def _secret(name: str, raw: str) -> Secret:
    value = raw.strip()
    if value and value.lower() in {"changeme", "your_secret_key", "your-secret-key", "xxx", "<secret>"}:
        raise SettingsError(f"{name} holds a placeholder value: set the real secret or leave it unset")
    return Secret(value)


def _choice(*options: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise SettingsError(f"{name}={raw!r} is not one of: {', '.join(options)}")
        return value

    return parse


def _url(name: str, raw: str) -> str | None:
    value = raw.strip()
    if not value:
        return None
    if not (value.startswith("http://") or value.startswith("https://")):
        raise SettingsError(f"{name}={value!r} is not an http(s) URL")
    return value


def _path(name: str, raw: str) -> Path:
    value = raw.strip()
    if not value:
        raise SettingsError(f"{name} is empty: give a path")
    path = Path(value).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def _memory(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if not value or not value[:-1].isdigit() or value[-1] not in "kmgt":
        raise SettingsError(f"{name}={raw!r} is not a JVM memory size such as 1g or 512m")
    return value


def _setting(env: str, default: str, parse: Callable[[str, str], Any], doc: str) -> Any:
    return field(metadata={"env": env, "default": default, "parse": parse, "doc": doc})


@dataclass(frozen=True)
class Settings:
    """All configuration of the daemon (SPEC §6 plus a few operational knobs)."""

    aws_access_key_id: Secret = _setting("AWS_ACCESS_KEY_ID", "", _secret, "S3 access key (or use the AWS chain)")
    aws_secret_access_key: Secret = _setting("AWS_SECRET_ACCESS_KEY", "", _secret, "S3 secret key")
    aws_region: str = _setting("AWS_REGION", "us-east-1", _str, "region of the bucket")
    s3_bucket_name: str | None = _setting("S3_BUCKET_NAME", "", _opt_str, "lake bucket; unset -> local lake")
    s3_endpoint_url: str | None = _setting("S3_ENDPOINT_URL", "", _url, "S3-compatible endpoint (MinIO, tests)")
    local_lake_dir: Path = _setting("LOCAL_LAKE_DIR", "data/lake", _path, "lake directory when no bucket is set")
    postgres_host: str | None = _setting("POSTGRES_HOST", "", _opt_str, "PostgreSQL host; unset -> embedded")
    postgres_port: int = _setting("POSTGRES_PORT", "5432", _int(1, 65535), "PostgreSQL port")
    postgres_db: str = _setting("POSTGRES_DB", "transactions", _str, "PostgreSQL database")
    postgres_user: str = _setting("POSTGRES_USER", "postgres", _str, "PostgreSQL user")
    postgres_password: Secret = _setting("POSTGRES_PASSWORD", "", _secret, "PostgreSQL password")
    gdrive_folder_id: str | None = _setting("GDRIVE_FOLDER_ID", "", _opt_str, "Drive folder; unset -> local inbox")
    google_credentials_path: Path = _setting(
        "GOOGLE_CREDENTIALS_PATH", "config/google_credentials.json", _path, "service-account key file"
    )
    gdrive_api_endpoint: str | None = _setting("GDRIVE_API_ENDPOINT", "", _url, "Drive API base URL override")
    local_inbox_dir: Path = _setting("LOCAL_INBOX_DIR", "data/inbox", _path, "folder watched when no Drive folder")
    data_dir: Path = _setting("DATA_DIR", "data", _path, "embedded PostgreSQL, Spark scratch, downloads")
    batch_size: int = _setting("BATCH_SIZE", "10000", _int(1, 10_000_000), "rows per chunk")
    chunk_interval_seconds: float = _setting("CHUNK_INTERVAL_SECONDS", "1", _float(0), "pause between chunks")
    processing_interval: float = _setting("PROCESSING_INTERVAL", "30", _float(0, exclusive_min=True), "poll period")
    max_workers: int = _setting("MAX_WORKERS", "4", _int(1, 64), "parallel uploads/downloads")
    detections_per_file: int = _setting("DETECTIONS_PER_FILE", "50", _int(1, 1_000_000), "detections per lake file")
    detections_flush_seconds: float = _setting(
        "DETECTIONS_FLUSH_SECONDS", "5", _float(0, exclusive_min=True), "flush a partial file after this idle time"
    )
    y_max_batch_chunks: int = _setting(
        "Y_MAX_BATCH_CHUNKS",
        "20",
        _int(1, 1000),
        "most waiting chunks (and 200,000 rows) Mechanism Y folds in one Spark pass; each is judged at its own boundary",
    )
    spark_master: str = _setting("SPARK_MASTER", "local[*]", _str, "Spark master URL")
    spark_driver_memory: str = _setting("SPARK_DRIVER_MEMORY", "1g", _memory, "Spark driver memory")
    spark_ui_enabled: bool = _setting(
        "SPARK_UI_ENABLED", "false", lambda n, r: _choice("true", "false")(n, r) == "true", "Spark web UI"
    )
    spark_jars: str | None = _setting("SPARK_JARS", "", _opt_str, "local hadoop-aws/SDK jars (offline machines)")
    patid1_min_merchant_txns: int = _setting("PATID1_MIN_MERCHANT_TXNS", "50000", _int(0), "PatId1: T(m) >")
    patid1_count_percentile: float = _setting("PATID1_COUNT_PERCENTILE", "0.9", _float(0, 1), "PatId1: n >= P_q(n)")
    patid1_weight_percentile: float = _setting("PATID1_WEIGHT_PERCENTILE", "0.1", _float(0, 1), "PatId1: w <= P_q(w)")
    patid2_max_avg_amount: float = _setting("PATID2_MAX_AVG_AMOUNT", "23", _float(0), "PatId2: mean amount <")
    patid2_min_txns: int = _setting("PATID2_MIN_TXNS", "80", _int(0), "PatId2: n >=")
    patid3_min_female_customers: int = _setting("PATID3_MIN_FEMALE_CUSTOMERS", "100", _int(0), "PatId3: F(m) >")
    log_level: str = _setting(
        "LOG_LEVEL", "INFO", lambda n, r: _choice("debug", "info", "warning", "error")(n, r).upper(), "log level"
    )
    log_format: str = _setting(
        "LOG_FORMAT", "auto", _choice("auto", "text", "json"), "auto: text on a terminal, json otherwise"
    )
    log_file: Path | None = _setting(
        "LOG_FILE", "", lambda n, r: _path(n, r) if r.strip() else None, "also log to this file, rotated by size"
    )
    log_file_max_bytes: int = _setting("LOG_FILE_MAX_BYTES", "52428800", _int(1024), "rotate LOG_FILE at this size")
    log_file_backups: int = _setting("LOG_FILE_BACKUPS", "5", _int(0, 1000), "rotated (gzipped) log files kept")
    metrics_addr: str = _setting(
        "METRICS_ADDR", "127.0.0.1:9464", _str, "host:port of /metrics, /healthz, /readyz and the status page; off"
    )
    alert_webhook_url: str | None = _setting(
        "ALERT_WEBHOOK_URL", "", _url, "POST a JSON message here when an incident starts and when it resolves"
    )
    alert_quarantine_ratio: float = _setting(
        "ALERT_QUARANTINE_RATIO", "0.05", _float(0, 1), "alert when this share of recent rows is quarantined"
    )
    max_line_bytes: int = _setting(
        "MAX_LINE_BYTES", "1048576", _int(64, 1 << 30), "longer source lines are quarantined"
    )
    max_attempts: int = _setting(
        "MAX_ATTEMPTS", "5", _int(1, 1000), "failed attempts at one file or chunk before it is marked failed"
    )
    retry_max_delay_seconds: float = _setting(
        "RETRY_MAX_DELAY_SECONDS", "30", _float(0, exclusive_min=True), "cap of the backoff between retries"
    )
    postgres_connect_timeout: int = _setting(
        "POSTGRES_CONNECT_TIMEOUT", "10", _int(1, 3600), "seconds to wait for one connection attempt"
    )
    postgres_statement_timeout: int = _setting(
        "POSTGRES_STATEMENT_TIMEOUT", "300", _int(0, 86400), "seconds a statement may run; 0 = no limit"
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, dotenv: Path | None = None) -> "Settings":
        """Build and validate settings; `.env` (if any) fills in what the environment lacks."""
        env: dict[str, str] = {}
        if dotenv is None:
            dotenv = PROJECT_ROOT / ".env"
        if dotenv and dotenv.is_file():
            from dotenv import dotenv_values

            env.update({k: v for k, v in dotenv_values(dotenv).items() if v is not None})
        env.update(os.environ if environ is None else environ)
        values = {}
        for f in fields(cls):
            meta = f.metadata
            raw = env.get(meta["env"])
            if raw is None or (raw.strip() == "" and meta["default"] != ""):
                raw = meta["default"]
            values[f.name] = meta["parse"](meta["env"], raw)
        settings = cls(**values)
        settings._check()
        return settings

    def _check(self) -> None:
        if self.gdrive_folder_id:
            path = self.google_credentials_path
            if path.exists() and not path.is_file():
                raise SettingsError(
                    f"GOOGLE_CREDENTIALS_PATH={path} is not a file: point it at the service-account key"
                )
            if not path.is_file():
                raise SettingsError(
                    f"GOOGLE_CREDENTIALS_PATH={path} does not exist: download the service-account key there "
                    "or point GOOGLE_CREDENTIALS_PATH at it (README: Google Drive set-up)"
                )
            if not os.access(path, os.R_OK):
                raise SettingsError(f"GOOGLE_CREDENTIALS_PATH={path} is not readable by this user")
        if bool(self.aws_access_key_id) != bool(self.aws_secret_access_key):
            raise SettingsError("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together (or neither)")

    @staticmethod
    def env_names() -> list[str]:
        return [f.metadata["env"] for f in fields(Settings)]

    @property
    def embedded_postgres(self) -> bool:
        return not self.postgres_host

    @property
    def local_lake(self) -> bool:
        return not self.s3_bucket_name

    @property
    def local_inbox(self) -> bool:
        return not self.gdrive_folder_id

    def describe(self) -> dict[str, str]:
        """Settings safe to log: secrets masked."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.metadata["env"]] = repr(value) if isinstance(value, Secret) else str(value)
        return out

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Secret):
                value = value.get()
            elif isinstance(value, bool):
                value = "true" if value else "false"
            out[f.metadata["env"]] = "" if value is None else str(value)
        return out

"""Typed settings, built once from the environment (and `.env`) and validated at start.

Every variable of SPEC §6 is a field here (its name upper-cased is the variable) and a line in
`.env.template`; a test keeps the two in step. pydantic-settings does the typing and the bounds;
a bad value raises `SettingsError` whose message is one line naming the variable, never a secret.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping, get_args
from urllib.parse import urlsplit, urlunsplit

import annotated_types
from dotenv import dotenv_values
from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from src.errors import SettingsError

# The checkout; code imported from a zip (spark-submit --py-files) has none: `.env` and relative paths are then
# those of the directory it is launched from.
_CODE_HOME = Path(__file__).resolve().parent.parent
PROJECT_ROOT = _CODE_HOME if _CODE_HOME.is_dir() else Path.cwd()

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_PLACEHOLDERS = frozenset(
    {"changeme", "change_me", "change-me", "changethis", "replace_me", "xxx", "secret", "todo", "your_secret_key"}
)
_DAY = 86_400
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):")  # a scheme of 2+ letters: not a Windows drive
_SHAPES = {  # field -> (full match, what it must look like)
    "aws_region": (re.compile(r"[a-z0-9-]+"), "is not a region name such as us-east-1"),
    "s3_bucket_name": (
        re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"),
        "is not an S3 bucket name (3-63 lower-case letters, digits, dots, hyphens; no s3:// prefix)",
    ),
    "postgres_host": (re.compile(r"[^\s/@]+"), "is not a host name or address (no spaces, no URL)"),
    "gdrive_folder_id": (
        re.compile(r"[A-Za-z0-9_-]+"),
        "is not a Drive folder id (the last part of the folder's address, after /folders/)",
    ),
    "spark_master": (
        re.compile(r"local(\[(\*|[0-9]+)(,[0-9]+)?\])?|local-cluster\[[0-9, ]+\]|yarn|[a-z0-9+]+://\S+"),
        "is not a Spark master URL such as local[*], local[2] or spark://host:7077",
    ),
    "spark_driver_memory": (re.compile(r"[0-9]+[kmgt]"), "is not a JVM memory size such as 1g or 512m"),
}


def redact_url(url: str) -> str:
    """The URL without its userinfo (`https://user:pw@host/x` -> `https://***@host/x`), safe to log."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def _check_url(value: str) -> str:
    """An http(s) URL; plain http only to this machine, so credentials and data never cross a network in clear."""
    try:
        parts = urlsplit(value)
        host, _port = parts.hostname, parts.port
    except ValueError:
        host = None
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError("is not an http(s) URL such as https://host:9000/path")
    if parts.scheme == "http" and host not in LOCAL_HOSTS:
        raise ValueError("must use https: plain http is allowed only for 127.0.0.1, localhost or ::1")
    return value


def _check_host_port(value: str) -> str:
    """`host:port` (`[::1]:9464` for IPv6) or `off`."""
    if value.lower() == "off":
        return "off"
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            host = ""
    valid_host = bool(re.fullmatch(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]", host))
    if not (sep and valid_host and port.isdigit() and int(port) <= 65535):
        raise ValueError("is not host:port (such as 127.0.0.1:9464, [::1]:9464, 0.0.0.0:9464) or off")
    return value


def _is_placeholder(value: str) -> bool:
    low = value.lower()
    return low in _PLACEHOLDERS or (low.startswith(("your_", "your-", "<")) and low.endswith(("key", "password", ">")))


def _seconds(default: float, doc: str, *, positive: bool) -> Any:
    """A duration: finite, at most a day, and > 0 where 0 would spin."""
    bound = {"gt": 0} if positive else {"ge": 0}
    return Field(default, description=doc, le=_DAY, allow_inf_nan=False, **bound)


class Settings(BaseSettings):
    """All configuration of the daemon (SPEC §6 plus a few operational knobs); build it with `from_env`."""

    model_config = SettingsConfigDict(
        frozen=True,
        alias_generator=str.upper,
        case_sensitive=True,
        extra="ignore",
        validate_default=True,
        hide_input_in_errors=True,
    )

    aws_access_key_id: SecretStr = Field(SecretStr(""), description="S3 access key (or use the AWS chain)")
    aws_secret_access_key: SecretStr = Field(SecretStr(""), description="S3 secret key")
    aws_region: str = Field("us-east-1", description="region of the bucket")
    s3_bucket_name: str | None = Field(None, description="lake bucket; unset -> local lake")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, tests); https unless local")
    local_lake_dir: Path = Field(Path("data/lake"), description="lake directory when no bucket is set")
    postgres_host: str | None = Field(None, description="PostgreSQL host; unset -> embedded")
    postgres_port: int = Field(5432, description="PostgreSQL port", ge=1, le=65535)
    postgres_db: str = Field("transactions", description="PostgreSQL database")
    postgres_user: str = Field("postgres", description="PostgreSQL user")
    postgres_password: SecretStr = Field(SecretStr(""), description="PostgreSQL password")
    gdrive_folder_id: str | None = Field(None, description="Drive folder; unset -> local inbox")
    google_credentials_path: Path = Field(
        Path("config/google_credentials.json"), description="service-account key file"
    )
    gdrive_api_endpoint: str | None = Field(None, description="Drive API base URL override; https unless local")
    local_inbox_dir: Path = Field(Path("data/inbox"), description="folder watched when no Drive folder")
    data_dir: Path = Field(Path("data"), description="embedded PostgreSQL, Spark scratch, downloads")
    batch_size: int = Field(10_000, description="rows per chunk", ge=1, le=10_000_000)
    chunk_interval_seconds: float = _seconds(1, "pause between chunks", positive=False)
    processing_interval: float = _seconds(30, "poll period", positive=True)
    max_workers: int = Field(4, description="parallel uploads/downloads", ge=1, le=64)
    detections_per_file: int = Field(50, description="detections per lake file", ge=1, le=1_000_000)
    detections_flush_seconds: float = _seconds(5, "flush a partial file after this idle time", positive=True)
    y_max_batch_chunks: int = Field(
        20,
        description="most waiting chunks (and 200,000 rows) Mechanism Y folds in one Spark pass; "
        "each is judged at its own boundary",
        ge=1,
        le=1000,
    )
    x_lease_seconds: float = _seconds(
        15, "a file leased to one Mechanism X is free this long after its holder's last renewal", positive=True
    )
    x_lease_renew_seconds: float = _seconds(5, "a Mechanism X renews its file leases this often", positive=True)
    y_standby_poll_seconds: float = _seconds(
        1, "a standby Mechanism Y looks this often whether the leader's lock is free", positive=True
    )
    spark_master: str = Field("local[*]", description="Spark master URL")
    spark_driver_memory: str = Field("1g", description="Spark driver memory")
    spark_ui_enabled: bool = Field(False, description="Spark web UI")
    spark_driver_jit: Literal["auto", "c1", "tiered"] = Field(
        "auto",
        description="the driver JVM's compilers. c1: quick to warm up, for short runs; tiered: C1 then C2, about a "
        "third less time per batch once warm, after a minute of extra compiling on 2 cores; auto: tiered for the "
        "daemon's Mechanism Y (python main.py), c1 for --drain and one-off commands",
    )
    spark_class_archive: Literal["auto", "off"] = Field(
        "auto",
        description="auto: once Mechanism Y has been idle for 30 s, it builds the driver JVM's class archive in the "
        "background (once per Java and Spark), and its later starts map it; off: never",
    )
    spark_jars: str | None = Field(None, description="local hadoop-aws/SDK jars (offline machines)")
    spark_checkpoint_dir: str | None = Field(
        None,
        description="Y's state checkpoints; shared storage (s3a://...) on a cluster; unset -> DATA_DIR/spark/checkpoints",
    )
    local_lake_shared: bool = Field(
        False, description="LOCAL_LAKE_DIR and a local SPARK_CHECKPOINT_DIR are mounted alike on every Spark machine"
    )
    patid1_min_merchant_txns: int = Field(50_000, description="PatId1: T(m) >", ge=0)
    patid1_count_percentile: float = Field(0.9, description="PatId1: n >= P_q(n)", ge=0, le=1)
    patid1_weight_percentile: float = Field(0.1, description="PatId1: w <= P_q(w)", ge=0, le=1)
    patid2_max_avg_amount: float = Field(23, description="PatId2: mean amount <", ge=0, allow_inf_nan=False)
    patid2_min_txns: int = Field(80, description="PatId2: n >=", ge=0)
    patid3_min_female_customers: int = Field(100, description="PatId3: F(m) >", ge=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    log_format: Literal["auto", "text", "json"] = Field("auto", description="auto: text on a terminal, json otherwise")
    log_file: Path | None = Field(None, description="also log to this file, rotated by size")
    log_file_max_bytes: int = Field(52_428_800, description="rotate LOG_FILE at this size", ge=1024, le=1 << 40)
    log_file_backups: int = Field(5, description="rotated (gzipped) log files kept", ge=0, le=1000)
    metrics_addr: str = Field(
        "127.0.0.1:9464", description="host:port of /metrics, /healthz, /readyz and the status page; off"
    )
    alert_webhook_url: SecretStr = Field(
        SecretStr(""), description="POST a JSON message here when an incident starts and when it resolves"
    )
    alert_quarantine_ratio: float = Field(
        0.05, description="alert when this share of recent rows is quarantined", ge=0, le=1
    )
    max_line_bytes: int = Field(1_048_576, description="longer source lines are quarantined", ge=64, le=1 << 30)
    max_attempts: int = Field(
        5, description="failed attempts at one file or chunk before it is marked failed", ge=1, le=1000
    )
    retry_max_delay_seconds: float = Field(
        30, description="cap of the backoff between retries", gt=0, le=3600, allow_inf_nan=False
    )
    postgres_connect_timeout: int = Field(10, description="seconds to wait for one connection attempt", ge=1, le=3600)
    postgres_statement_timeout: int = Field(300, description="seconds a statement may run; 0 = no limit", ge=0, le=_DAY)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only what `from_env` passes: an explicit mapping must not be topped up from `os.environ`."""
        return (init_settings,)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, dotenv: Path | None = None) -> Settings:
        """Build and validate settings; `.env` (if any) fills in what the environment lacks.

        `environ` (tests, a child's environment) replaces `os.environ` entirely. An empty value
        means the default, as in a freshly copied `.env.template`.
        """
        env: dict[str, str] = {}
        dotenv = PROJECT_ROOT / ".env" if dotenv is None else dotenv
        if dotenv.is_file():
            env.update({k: v for k, v in dotenv_values(dotenv).items() if v is not None})
        env.update(os.environ if environ is None else environ)
        values = {name: env[name] for name in cls.env_names() if env.get(name, "").strip()}
        try:
            return cls(**values)
        except ValidationError as exc:
            raise SettingsError(_one_line(exc, values)) from None

    @field_validator("*", mode="before")
    @classmethod
    def _strip(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value

    @field_validator("local_lake_dir", "google_credentials_path", "local_inbox_dir", "data_dir", "log_file")
    @classmethod
    def _under_project(cls, path: Path | None) -> Path | None:
        """Relative paths are relative to the project root, whatever the working directory."""
        if path is None:
            return None
        path = path.expanduser()
        return path if path.is_absolute() else PROJECT_ROOT / path

    @field_validator("spark_checkpoint_dir")
    @classmethod
    def _checkpoint_dir(cls, value: str | None) -> str | None:
        """A URL (s3a://, hdfs://, file:/...) is kept as written; a plain path is relative to the project root."""
        if not value or _URL_SCHEME.match(value):
            return value or None
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else PROJECT_ROOT / path)

    @field_validator("aws_access_key_id", "aws_secret_access_key", "postgres_password", "alert_webhook_url")
    @classmethod
    def _no_placeholder(cls, secret: SecretStr) -> SecretStr:
        if _is_placeholder(secret.get_secret_value()):
            raise ValueError("holds a placeholder value: set the real secret or leave it unset")
        return secret

    @field_validator("s3_endpoint_url", "gdrive_api_endpoint")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value)

    @field_validator("alert_webhook_url")
    @classmethod
    def _secret_url(cls, secret: SecretStr) -> SecretStr:
        if secret.get_secret_value():
            _check_url(secret.get_secret_value())
        return secret

    @field_validator("metrics_addr")
    @classmethod
    def _metrics_addr(cls, value: str) -> str:
        return _check_host_port(value)

    @field_validator(*_SHAPES)
    @classmethod
    def _shape(cls, value: str | None, info: ValidationInfo) -> str | None:
        shape, reason = _SHAPES[info.field_name]
        if value is not None and not shape.fullmatch(value):
            raise ValueError(reason)
        return value

    @field_validator(
        "log_level", "log_format", "spark_driver_memory", "spark_class_archive", "spark_driver_jit", mode="before"
    )
    @classmethod
    def _choice_case(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, str):
            return value
        return value.upper() if info.field_name == "log_level" else value.lower()  # names in any case

    @model_validator(mode="after")
    def _check(self) -> Settings:
        """Checks across settings; their messages name every variable involved.

        They raise `SettingsError` itself, which pydantic lets through (it wraps only ValueError).
        """
        if self.gdrive_folder_id:
            _check_credentials(self.google_credentials_path)
        if bool(self.aws_access_key_id) != bool(self.aws_secret_access_key):
            raise SettingsError("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together (or neither)")
        _check_cluster_paths(self)
        if self.x_lease_renew_seconds * 2 > self.x_lease_seconds:
            raise SettingsError(
                f"X_LEASE_RENEW_SECONDS={self.x_lease_renew_seconds:g} must be at most half of "
                f"X_LEASE_SECONDS={self.x_lease_seconds:g}: a lease renewed less often than that expires under a "
                "live holder after one late renewal, and another daemon takes its file over"
            )
        return self

    @classmethod
    def env_names(cls) -> list[str]:
        """The environment variables read, in field order."""
        return [field.alias or name.upper() for name, field in cls.model_fields.items()]

    @property
    def embedded_postgres(self) -> bool:
        return not self.postgres_host

    @property
    def local_lake(self) -> bool:
        return not self.s3_bucket_name

    @property
    def spark_local(self) -> bool:
        """Spark runs in this process's JVM (local[...], local-cluster[...]): every path it touches is ours."""
        return self.spark_master.startswith("local")

    @property
    def checkpoint_dir(self) -> str:
        """Where Spark writes Y's reliable checkpoints (SPARK_CHECKPOINT_DIR, else DATA_DIR/spark/checkpoints)."""
        return self.spark_checkpoint_dir or str(self.data_dir / "spark" / "checkpoints")

    @property
    def local_inbox(self) -> bool:
        return not self.gdrive_folder_id

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """`METRICS_ADDR` as (host, port) to bind, or None when it is `off`."""
        if self.metrics_addr == "off":
            return None
        host, _, port = self.metrics_addr.rpartition(":")
        return host.strip("[]"), int(port)

    def describe(self) -> dict[str, str]:
        """Settings safe to log: secrets masked, URLs without userinfo."""
        secrets = {env for env, value in self._items() if isinstance(value, SecretStr)}
        return {
            env: ("**********" if value else "") if env in secrets else redact_url(value)
            for env, value in self.to_env().items()
        }

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        out = {}
        for name, value in self._items():
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, bool):
                value = "true" if value else "false"
            out[name] = "" if value is None else str(value)
        return out

    def __repr_args__(self) -> Any:
        """The repr (and str) of the settings never shows a URL's userinfo; SecretStr masks itself."""
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if isinstance(value, str) else value

    def _items(self) -> list[tuple[str, Any]]:
        return [(env, getattr(self, name)) for env, name in zip(self.env_names(), type(self).model_fields)]


def is_local_path(location: str) -> bool:
    """A path of this machine's file system (no scheme, or file:), which executors elsewhere do not see."""
    match = _URL_SCHEME.match(location)
    return match is None or match.group(1).lower() == "file"


def _check_cluster_paths(s: Settings) -> None:
    """With executors on other machines, everything they read or write must be shared storage (SPEC §9)."""
    if s.spark_local or s.local_lake_shared:
        return
    master = redact_url(s.spark_master)
    if s.local_lake:
        raise SettingsError(
            f"LOCAL_LAKE_DIR={s.local_lake_dir} is a local lake that the executors of SPARK_MASTER={master} cannot "
            "read: set S3_BUCKET_NAME, or LOCAL_LAKE_SHARED=true if it is shared storage mounted at the same path "
            "on every machine"
        )
    if is_local_path(s.checkpoint_dir):
        raise SettingsError(
            f"SPARK_CHECKPOINT_DIR={s.checkpoint_dir} is a local path that the executors of SPARK_MASTER={master} "
            "cannot share: set it to shared storage such as s3a://<bucket>/checkpoints, or LOCAL_LAKE_SHARED=true "
            "if it is mounted at the same path on every machine"
        )


def _check_credentials(path: Path) -> None:
    if path.exists() and not path.is_file():
        raise SettingsError(f"GOOGLE_CREDENTIALS_PATH={path} is not a file: point it at the service-account key")
    if not path.is_file():
        raise SettingsError(
            f"GOOGLE_CREDENTIALS_PATH={path} does not exist: download the service-account key there "
            "or point GOOGLE_CREDENTIALS_PATH at it (README: Google Drive set-up)"
        )
    if not os.access(path, os.R_OK):
        raise SettingsError(f"GOOGLE_CREDENTIALS_PATH={path} is not readable by this user")


_REASONS = {
    "int_parsing": "is not a whole number",
    "int_from_float": "is not a whole number",
    "int_type": "is not a whole number",
    "float_parsing": "is not a number",
    "float_type": "is not a number",
    "finite_number": "is not a finite number",
    "bool_parsing": "is not true or false",
}
_RANGE = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _one_line(exc: ValidationError, raw: Mapping[str, str]) -> str:
    """The first bad setting as one line (`NAME='value' reason`), naming any others; never a secret's value.

    The value shown is the one the operator wrote (`raw`), not pydantic's normalised input.
    """
    errors = exc.errors(include_url=False)
    names = list(dict.fromkeys(str(e["loc"][0]) if e["loc"] else "settings" for e in errors))
    line = _describe_error(names[0], errors[0], raw)
    return line + (f" (also check {', '.join(names[1:])})" if len(names) > 1 else "")


def _describe_error(env: str, error: Any, raw: Mapping[str, str]) -> str:
    field = Settings.model_fields.get(env.lower())
    kind = error["type"]
    if kind == "value_error":
        reason = str(error["ctx"]["error"])
    elif kind in _RANGE and field is not None:
        reason = f"is out of range: it must be {_bounds(field)}"
    elif kind == "literal_error" and field is not None:
        reason = "is not one of: " + ", ".join(str(a).lower() for a in get_args(field.annotation))
    else:
        reason = _REASONS.get(kind, "is not valid: " + error["msg"])
    if field is None or field.annotation is SecretStr:  # never echo a secret (or a whole mapping)
        return f"{env} {reason}"
    shown = raw.get(env, error.get("input"))
    return f"{env}={redact_url(shown) if isinstance(shown, str) else shown!r} {reason}"


def _bounds(field: Any) -> str:
    """The allowed range of a numeric field, as the operator should read it (`between 1 and 64`, `> 0`)."""
    low = high = ""
    for bound in field.metadata:
        if isinstance(bound, annotated_types.Ge):
            low = f">= {bound.ge}"
        elif isinstance(bound, annotated_types.Gt):
            low = f"> {bound.gt}"
        elif isinstance(bound, annotated_types.Le):
            high = f"<= {bound.le}"
        elif isinstance(bound, annotated_types.Lt):
            high = f"< {bound.lt}"
    if low.startswith(">=") and high.startswith("<="):
        return f"between {low[3:]} and {high[3:]}"
    return " and ".join(b for b in (low, high) if b)

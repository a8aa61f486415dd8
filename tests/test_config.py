"""Settings: SPEC §6 defaults, one-line errors naming the variable, masked secrets, `.env.template` in step."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from config.config import PROJECT_ROOT, Settings, redact_url
from src.errors import SettingsError

ROOT = Path(__file__).resolve().parent.parent
NO_DOTENV = Path("/nonexistent")


def build(**env: str) -> Settings:
    return Settings.from_env(env, dotenv=NO_DOTENV)


def settings_error(**env: str) -> str:
    with pytest.raises(SettingsError) as info:
        build(**env)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message and message
    return message


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any product setting, plus `extra`."""
    names = set(Settings.env_names()) | {"TP_DATABASE_URL"}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(PYTHONPATH=str(ROOT), SPARK_LOCAL_IP="127.0.0.1", **extra)
    return env


def test_defaults_are_those_of_the_spec():
    s = build()
    assert s.batch_size == 10_000
    assert s.chunk_interval_seconds == 1
    assert s.processing_interval == 30
    assert s.max_workers == 4
    assert (s.detections_per_file, s.detections_flush_seconds) == (50, 5)
    assert s.spark_master == "local[*]"
    assert (s.patid1_min_merchant_txns, s.patid1_count_percentile, s.patid1_weight_percentile) == (50_000, 0.9, 0.1)
    assert (s.patid2_max_avg_amount, s.patid2_min_txns, s.patid3_min_female_customers) == (23, 80, 100)
    assert s.aws_region == "us-east-1"
    assert s.local_lake_dir == PROJECT_ROOT / "data" / "lake"
    assert s.local_inbox_dir == PROJECT_ROOT / "data" / "inbox"
    assert s.google_credentials_path == PROJECT_ROOT / "config" / "google_credentials.json"
    assert s.embedded_postgres and s.local_lake and s.local_inbox
    assert s.s3_bucket_name is None and s.postgres_host is None and s.gdrive_folder_id is None


def test_values_are_parsed_and_typed():
    s = build(
        BATCH_SIZE=" 500 ",
        CHUNK_INTERVAL_SECONDS="0",
        PROCESSING_INTERVAL="0.25",
        POSTGRES_HOST="db.internal",
        POSTGRES_PORT="6543",
        S3_BUCKET_NAME="lake-bucket",
        LOCAL_LAKE_DIR="/srv/lake",
        PATID1_MIN_MERCHANT_TXNS="5",
    )
    assert (s.batch_size, s.chunk_interval_seconds, s.processing_interval) == (500, 0.0, 0.25)
    assert (s.postgres_host, s.postgres_port, s.s3_bucket_name) == ("db.internal", 6543, "lake-bucket")
    assert s.local_lake_dir == Path("/srv/lake")
    assert s.patid1_min_merchant_txns == 5
    assert not s.embedded_postgres and not s.local_lake
    assert build(BATCH_SIZE="").batch_size == 10_000  # empty means default, as in a copied template


# A value of each variable that must be refused, and words the one-line message must hold.
BAD_VALUES = [
    ("AWS_ACCESS_KEY_ID", "changeme", ["placeholder"]),
    ("AWS_SECRET_ACCESS_KEY", "your_secret_key", ["placeholder"]),
    ("AWS_REGION", "us east 1", ["'us east 1'", "region"]),
    ("S3_BUCKET_NAME", "s3://lake", ["'s3://lake'", "bucket name"]),
    ("S3_ENDPOINT_URL", "ftp://minio:9000", ["URL"]),
    ("S3_ENDPOINT_URL", "http://minio:9000", ["https", "127.0.0.1"]),
    ("POSTGRES_HOST", "postgres://db:5432", ["host name"]),
    ("POSTGRES_PORT", "99999", ["out of range", "between 1 and 65535"]),
    ("POSTGRES_PORT", "pg", ["whole number"]),
    ("POSTGRES_PASSWORD", "changeme", ["placeholder"]),
    ("GDRIVE_FOLDER_ID", "https://drive.google.com/drive/folders/1AbC", ["folder id"]),
    ("GOOGLE_CREDENTIALS_PATH", "/nonexistent/key.json", ["does not exist"]),
    ("GDRIVE_API_ENDPOINT", "http://www.googleapis.com/drive/v3/", ["https"]),
    ("BATCH_SIZE", "abc", ["'abc'", "whole number"]),
    ("BATCH_SIZE", "0", ["out of range"]),
    ("BATCH_SIZE", "-5", ["out of range"]),
    ("BATCH_SIZE", "1.5", ["whole number"]),
    ("CHUNK_INTERVAL_SECONDS", "-1", ["out of range", "between 0 and 86400"]),
    ("CHUNK_INTERVAL_SECONDS", "soon", ["not a number"]),
    ("CHUNK_INTERVAL_SECONDS", "nan", ["finite"]),
    ("PROCESSING_INTERVAL", "0", ["out of range", "> 0"]),
    ("PROCESSING_INTERVAL", "-30", ["out of range"]),
    ("MAX_WORKERS", "0", ["out of range"]),
    ("DETECTIONS_PER_FILE", "fifty", ["whole number"]),
    ("DETECTIONS_FLUSH_SECONDS", "0", ["out of range"]),
    ("Y_MAX_BATCH_CHUNKS", "1001", ["out of range", "between 1 and 1000"]),
    ("SPARK_MASTER", "lcoal[*]", ["Spark master"]),
    ("SPARK_DRIVER_MEMORY", "lots", ["memory"]),
    ("SPARK_UI_ENABLED", "maybe", ["'maybe'", "true or false"]),
    ("SPARK_CLASS_ARCHIVE", "always", ["'always'", "auto, off"]),
    ("SPARK_DRIVER_JIT", "c2", ["'c2'", "auto, c1, tiered"]),
    ("SPARK_CHECKPOINT_DIR", "/var/tp/checkpoints", ["local path", "s3a://", "LOCAL_LAKE_SHARED=true"]),
    ("LOCAL_LAKE_SHARED", "maybe", ["'maybe'", "true or false"]),
    ("PATID1_MIN_MERCHANT_TXNS", "-1", ["out of range", ">= 0"]),
    ("PATID1_COUNT_PERCENTILE", "1.5", ["out of range", "between 0 and 1"]),
    ("PATID1_WEIGHT_PERCENTILE", "-0.1", ["out of range"]),
    ("PATID2_MAX_AVG_AMOUNT", "inf", ["finite"]),
    ("PATID2_MIN_TXNS", "-1", ["out of range"]),
    ("PATID3_MIN_FEMALE_CUSTOMERS", "many", ["whole number"]),
    ("LOG_LEVEL", "verbose", ["'verbose'", "debug, info, warning, error"]),
    ("LOG_FORMAT", "xml", ["'xml'", "auto, text, json"]),
    ("LOG_FILE_MAX_BYTES", "100", ["out of range"]),
    ("LOG_FILE_BACKUPS", "-1", ["out of range"]),
    ("METRICS_ADDR", "9464", ["'9464'", "host:port", "off"]),
    ("ALERT_WEBHOOK_URL", "http://hooks.slack.com/services/T0/B0/tok-Zq81", ["https"]),
    ("ALERT_WEBHOOK_URL", "hooks.slack.com/services/T0/B0/tok-Zq81", ["URL"]),
    ("ALERT_QUARANTINE_RATIO", "2", ["out of range", "between 0 and 1"]),
    ("MAX_LINE_BYTES", "10", ["out of range"]),
    ("MAX_ATTEMPTS", "0", ["out of range"]),
    ("RETRY_MAX_DELAY_SECONDS", "0", ["out of range", "> 0"]),
    ("POSTGRES_CONNECT_TIMEOUT", "0", ["out of range"]),
    ("POSTGRES_STATEMENT_TIMEOUT", "-1", ["out of range"]),
    ("X_LEASE_SECONDS", "0", ["out of range", "> 0"]),
    ("X_LEASE_RENEW_SECONDS", "-1", ["out of range"]),
    ("Y_STANDBY_POLL_SECONDS", "0", ["out of range", "> 0"]),
]
# Settings where any text is a valid value (a path, a name), so no value can be refused on sight.
FREE_TEXT = {"LOCAL_LAKE_DIR", "POSTGRES_DB", "POSTGRES_USER", "LOCAL_INBOX_DIR", "DATA_DIR", "SPARK_JARS", "LOG_FILE"}
# What a variable needs beside it for its own check to run.
COMPANIONS = {
    "AWS_ACCESS_KEY_ID": {"AWS_SECRET_ACCESS_KEY": "aws-secret-Wv55"},
    "AWS_SECRET_ACCESS_KEY": {"AWS_ACCESS_KEY_ID": "AKIA-ID-Xy12"},
    "GOOGLE_CREDENTIALS_PATH": {"GDRIVE_FOLDER_ID": "folder123"},
    "SPARK_CHECKPOINT_DIR": {"SPARK_MASTER": "spark://spark-master:7077", "S3_BUCKET_NAME": "lake-bucket"},
}
SECRETS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "POSTGRES_PASSWORD", "ALERT_WEBHOOK_URL"}


def test_every_variable_has_a_refused_value_or_is_free_text():
    covered = {name for name, _, _ in BAD_VALUES}
    assert sorted(set(Settings.env_names()) - covered - FREE_TEXT) == []
    assert covered & FREE_TEXT == set() and FREE_TEXT <= set(Settings.env_names())


@pytest.mark.parametrize("name, value, words", BAD_VALUES)
def test_bad_value_is_one_line_naming_the_variable(name, value, words):
    message = settings_error(**{name: value, **COMPANIONS.get(name, {})})
    assert message.startswith(name), message
    for word in words:
        assert word in message, (message, word)
    if name in SECRETS:
        assert value not in message and "tok-Zq81" not in message


def test_lease_renewal_must_fit_twice_in_the_lease():
    """A lease renewed less often than half its length expires under a live holder after one late renewal."""
    message = settings_error(X_LEASE_SECONDS="10", X_LEASE_RENEW_SECONDS="6")
    assert "X_LEASE_RENEW_SECONDS=6" in message and "X_LEASE_SECONDS=10" in message and "half" in message
    assert "\n" not in message
    assert build(X_LEASE_SECONDS="10", X_LEASE_RENEW_SECONDS="5").x_lease_renew_seconds == 5
    defaults = build()
    assert (defaults.x_lease_seconds, defaults.x_lease_renew_seconds, defaults.y_standby_poll_seconds) == (15, 5, 1)


def test_several_bad_values_are_named_on_the_one_line():
    message = settings_error(BATCH_SIZE="abc", MAX_WORKERS="0", LOG_FORMAT="xml")
    assert message.startswith("BATCH_SIZE='abc' is not a whole number")
    assert "MAX_WORKERS" in message and "LOG_FORMAT" in message


def test_missing_credentials_file_with_a_drive_folder(tmp_path):
    missing = tmp_path / "nope" / "key.json"
    message = settings_error(GDRIVE_FOLDER_ID="folder123", GOOGLE_CREDENTIALS_PATH=str(missing))
    assert "GOOGLE_CREDENTIALS_PATH" in message and str(missing) in message and "does not exist" in message
    # a directory is not a key file either
    message = settings_error(GDRIVE_FOLDER_ID="folder123", GOOGLE_CREDENTIALS_PATH=str(tmp_path))
    assert "GOOGLE_CREDENTIALS_PATH" in message and "not a file" in message
    # without a Drive folder the key is not needed
    assert build(GOOGLE_CREDENTIALS_PATH=str(missing)).google_credentials_path == missing


def test_unreadable_credentials_file_with_a_drive_folder(tmp_path, monkeypatch):
    key = tmp_path / "key.json"
    key.write_text("{}")
    key.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make the permission check see what another user would
        import config.config as config_module

        real_access = os.access
        monkeypatch.setattr(
            config_module.os,
            "access",
            lambda p, mode, **kw: False if Path(p) == key and mode == os.R_OK else real_access(p, mode, **kw),
        )
    message = settings_error(GDRIVE_FOLDER_ID="folder123", GOOGLE_CREDENTIALS_PATH=str(key))
    assert "GOOGLE_CREDENTIALS_PATH" in message and "not readable" in message
    key.chmod(0o600)
    monkeypatch.undo()
    assert build(GDRIVE_FOLDER_ID="folder123", GOOGLE_CREDENTIALS_PATH=str(key)).gdrive_folder_id == "folder123"


@pytest.mark.parametrize("name", ["POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
@pytest.mark.parametrize("value", ["changeme", " ChangeMe ", "<secret>", "your-secret-key", "your_password", "xxx"])
def test_placeholder_secret_is_refused(name, value):
    env = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value", name: value}
    message = settings_error(**env)
    assert message == f"{name} holds a placeholder value: set the real secret or leave it unset"
    assert build(**{**env, name: "a-real-value-" + value.strip()}).to_env()[name].startswith("a-real-value-")


def test_aws_keys_come_in_pairs():
    message = settings_error(AWS_ACCESS_KEY_ID="AKIAEXAMPLE")
    assert "AWS_ACCESS_KEY_ID" in message and "AWS_SECRET_ACCESS_KEY" in message


SECRET_VALUES = {
    "POSTGRES_PASSWORD": "pg-pass-Zq81",
    "AWS_ACCESS_KEY_ID": "AKIA-ID-Xy12",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-Wv55",
    "ALERT_WEBHOOK_URL": "https://hooks.slack.com/services/T0/B0/hook-Kp09",
}
SECRET_WORDS = ["Zq81", "Xy12", "Wv55", "hook-Kp09", "url-pw-Rt44"]


def assert_no_secret(text: str) -> None:
    for word in SECRET_WORDS:
        assert word not in text, (word, text)


def test_secrets_are_masked_when_printed_or_logged():
    s = build(**SECRET_VALUES, POSTGRES_HOST="db", S3_ENDPOINT_URL="https://lake:url-pw-Rt44@minio.internal:9000")
    described = s.describe()
    shown = [repr(s), str(s), f"{s}", str(described), repr(described), f"{s.postgres_password}"]
    for text in shown:
        assert_no_secret(text)
    for value in SECRET_VALUES.values():
        assert value not in s.model_dump_json() and value not in str(s.model_dump())
    assert set(described) == set(Settings.env_names())
    assert SECRETS == {name for name in described if isinstance(getattr(s, name.lower()), SecretStr)}
    for name in SECRETS:
        assert described[name] == "**********"
    assert described["POSTGRES_HOST"] == "db"
    assert described["S3_ENDPOINT_URL"] == "https://***@minio.internal:9000"
    assert build().describe()["POSTGRES_PASSWORD"] == ""  # unset is shown as unset
    # the real values are still there for the code that needs them
    assert s.postgres_password.get_secret_value() == "pg-pass-Zq81"
    assert s.alert_webhook_url.get_secret_value() == SECRET_VALUES["ALERT_WEBHOOK_URL"]
    assert s.to_env()["AWS_SECRET_ACCESS_KEY"] == "aws-secret-Wv55"


@pytest.mark.parametrize(
    "bad",
    [
        {"BATCH_SIZE": "abc"},
        {"ALERT_WEBHOOK_URL": "http://hooks.slack.com/services/T0/B0/hook-Kp09"},
        {"ALERT_WEBHOOK_URL": "hook-Kp09"},
        {"POSTGRES_PASSWORD": "your_secret_key"},
        {"S3_ENDPOINT_URL": "http://lake:url-pw-Rt44@minio.internal:9000"},
        {"AWS_SECRET_ACCESS_KEY": ""},
    ],
)
def test_an_error_never_shows_a_secret(bad):
    """Neither the one line nor the exception chain a traceback would print holds a secret."""
    with pytest.raises(SettingsError) as info:
        build(**{**SECRET_VALUES, **bad})
    assert_no_secret(str(info.value))
    assert_no_secret("".join(traceback.format_exception(info.value)))
    if info.value.__context__ is not None:
        assert_no_secret(str(info.value.__context__))


@pytest.mark.parametrize(
    "url, shown",
    [
        ("https://user:pw@host/x", "https://***@host/x"),
        ("https://token@host:8443/x?y=1#z", "https://***@host:8443/x?y=1#z"),
        ("http://u:p@ss@127.0.0.1:9000", "http://***@127.0.0.1:9000"),
        ("http://u:pw@[::1]:9000/", "http://***@[::1]:9000/"),
        ("https://host/path@not-userinfo", "https://host/path@not-userinfo"),
        ("https://host:9000/x", "https://host:9000/x"),
        ("not a url", "not a url"),
        ("", ""),
    ],
)
def test_redact_url_removes_userinfo_only(url, shown):
    assert redact_url(url) == shown


URL_SETTINGS = ["S3_ENDPOINT_URL", "GDRIVE_API_ENDPOINT", "ALERT_WEBHOOK_URL"]


@pytest.mark.parametrize("name", URL_SETTINGS)
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9000",
        "http://localhost:8080/drive/v3/",
        "http://[::1]:9000",
        "https://minio.internal:9000",
        "https://www.googleapis.com/drive/v3/",
        "HTTPS://Hooks.Slack.com/services/T0/B0/x",
    ],
)
def test_url_accepted_when_https_or_local(name, url):
    value = getattr(build(**{name: url}), name.lower())
    assert (value.get_secret_value() if isinstance(value, SecretStr) else value) == url


@pytest.mark.parametrize("name", URL_SETTINGS)
@pytest.mark.parametrize(
    "url, words",
    [
        ("http://minio.internal:9000", ["https"]),
        ("http://10.0.0.5:9000", ["https"]),
        ("http://127.0.0.2:9000", ["https"]),
        ("http://localhost.example.com", ["https"]),
        ("ftp://127.0.0.1/x", ["http(s) URL"]),
        ("https:///path-only", ["http(s) URL"]),
        ("https://host:port/", ["http(s) URL"]),
        ("minio:9000", ["http(s) URL"]),
    ],
)
def test_url_refused_when_plain_http_leaves_the_machine(name, url, words):
    message = settings_error(**{name: url})
    assert message.startswith(name)
    for word in words:
        assert word in message
    if name == "ALERT_WEBHOOK_URL":  # a webhook URL is a credential: never echoed
        assert url not in message


@pytest.mark.parametrize(
    "value, address",
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[::1]:9464", ("::1", 9464)),
        ("metrics.internal:65535", ("metrics.internal", 65535)),
        ("off", None),
        ("OFF", None),
        ("", ("127.0.0.1", 9464)),
    ],
)
def test_metrics_addr_is_host_port_or_off(value, address):
    assert build(METRICS_ADDR=value).metrics_address == address


@pytest.mark.parametrize(
    "value", ["9464", "127.0.0.1", "127.0.0.1:99999", "host:port", ":9464", "[::zz]:1", "a b:1", "::1:9464", "no"]
)
def test_metrics_addr_refuses_anything_else(value):
    message = settings_error(METRICS_ADDR=value)
    assert message.startswith(f"METRICS_ADDR={value!r}") and "host:port" in message


def test_log_format_and_level_take_any_case():
    s = build(LOG_FORMAT=" JSON ", LOG_LEVEL="debug")
    assert (s.log_format, s.log_level) == ("json", "DEBUG")
    assert build().log_format == "auto"


def test_numbers_have_bounds():
    """Every number has a lower bound, and floats refuse nan and inf: a typo cannot pass as a setting."""
    for name, field in Settings.model_fields.items():
        if field.annotation in (int, float):
            assert {type(m).__name__ for m in field.metadata} & {"Ge", "Gt"}, name
        if field.annotation is float:
            assert settings_error(**{name.upper(): "inf"}).startswith(name.upper())


# A valid value of every variable, none of them the default.
NON_DEFAULT = {
    **SECRET_VALUES,
    "AWS_REGION": "eu-west-1",
    "S3_BUCKET_NAME": "lake-bucket",
    "S3_ENDPOINT_URL": "https://minio.internal:9000",
    "LOCAL_LAKE_DIR": "/srv/lake",
    "POSTGRES_HOST": "db.internal",
    "POSTGRES_PORT": "6543",
    "POSTGRES_DB": "tx",
    "POSTGRES_USER": "tp",
    "GDRIVE_FOLDER_ID": "1AbC-d_E",
    "GDRIVE_API_ENDPOINT": "http://127.0.0.1:8080/drive/v3/",
    "LOCAL_INBOX_DIR": "inbox2",
    "DATA_DIR": "~/tp-data",
    "BATCH_SIZE": "7",
    "CHUNK_INTERVAL_SECONDS": "0",
    "PROCESSING_INTERVAL": "0.25",
    "MAX_WORKERS": "2",
    "DETECTIONS_PER_FILE": "3",
    "DETECTIONS_FLUSH_SECONDS": "1.5",
    "Y_MAX_BATCH_CHUNKS": "4",
    "X_LEASE_SECONDS": "30",
    "X_LEASE_RENEW_SECONDS": "10",
    "Y_STANDBY_POLL_SECONDS": "0.5",
    "SPARK_MASTER": "spark://spark-master:7077",
    "SPARK_DRIVER_MEMORY": "2G",
    "SPARK_UI_ENABLED": "true",
    "SPARK_CLASS_ARCHIVE": "OFF",
    "SPARK_DRIVER_JIT": "Tiered",
    "SPARK_JARS": "/opt/jars/*.jar",
    "SPARK_CHECKPOINT_DIR": "s3a://lake-bucket/checkpoints",
    "LOCAL_LAKE_SHARED": "true",
    "PATID1_MIN_MERCHANT_TXNS": "5",
    "PATID1_COUNT_PERCENTILE": "0.5",
    "PATID1_WEIGHT_PERCENTILE": "0.2",
    "PATID2_MAX_AVG_AMOUNT": "12.5",
    "PATID2_MIN_TXNS": "8",
    "PATID3_MIN_FEMALE_CUSTOMERS": "10",
    "LOG_LEVEL": "warning",
    "LOG_FORMAT": "json",
    "LOG_FILE": "logs/tp.log",
    "LOG_FILE_MAX_BYTES": "2048",
    "LOG_FILE_BACKUPS": "0",
    "METRICS_ADDR": "off",
    "ALERT_QUARANTINE_RATIO": "0.5",
    "MAX_LINE_BYTES": "4096",
    "MAX_ATTEMPTS": "3",
    "RETRY_MAX_DELAY_SECONDS": "2.5",
    "POSTGRES_CONNECT_TIMEOUT": "3",
    "POSTGRES_STATEMENT_TIMEOUT": "0",
}


def test_to_env_reproduces_the_settings_in_a_child(tmp_path):
    key = tmp_path / "key.json"
    key.write_text("{}")
    s = build(**NON_DEFAULT, GOOGLE_CREDENTIALS_PATH=str(key))
    defaults = build()
    assert sorted(set(Settings.env_names()) - set(s.to_env())) == []
    differ = {name for name, value in s.to_env().items() if value != defaults.to_env()[name]}
    assert differ == set(Settings.env_names()), "every variable takes a non-default value here"
    again = Settings.from_env(s.to_env(), dotenv=NO_DOTENV)
    assert again == s and again.to_env() == s.to_env()
    assert Settings.from_env(defaults.to_env(), dotenv=NO_DOTENV) == defaults
    assert (s.data_dir, s.local_inbox_dir) == (Path.home() / "tp-data", PROJECT_ROOT / "inbox2")
    assert (s.spark_driver_memory, s.log_level, s.spark_ui_enabled) == ("2g", "WARNING", True)


def test_settings_are_frozen():
    s = build()
    with pytest.raises(ValidationError):
        s.batch_size = 5  # type: ignore[misc]
    assert s.batch_size == 10_000 and hash(s) == hash(build())


def test_an_explicit_environ_replaces_the_process_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BATCH_SIZE", "77")
    monkeypatch.setenv("POSTGRES_HOST", "from-process")
    assert (build().batch_size, build().postgres_host) == (10_000, None)
    from_process = Settings.from_env(dotenv=NO_DOTENV)
    assert (from_process.batch_size, from_process.postgres_host) == (77, "from-process")
    dotenv = tmp_path / ".env"
    dotenv.write_text("BATCH_SIZE=5\nMAX_WORKERS=3\n")
    s = Settings.from_env(dotenv=dotenv)
    assert (s.batch_size, s.max_workers) == (77, 3)  # the process environment wins over .env
    monkeypatch.setenv("BATCH_SIZE", "")
    assert Settings.from_env(dotenv=dotenv).batch_size == 10_000  # an empty value means the default, even over .env
    assert Settings.from_env({}, dotenv=dotenv).batch_size == 5


def test_config_imports_nothing_from_src_but_errors():
    """`config` sits below the product: importing it must not pull in a worker or an adapter."""
    tree = ast.parse((ROOT / "config" / "config.py").read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        imported |= {a.name for a in node.names} if isinstance(node, ast.Import) else set()
        imported |= {node.module or ""} if isinstance(node, ast.ImportFrom) else set()
    assert {name for name in imported if name.split(".")[0] == "src"} == {"src.errors"}


def test_dotenv_fills_in_what_the_environment_lacks(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("BATCH_SIZE=123\nPROCESSING_INTERVAL=7\n# comment\n")
    s = Settings.from_env({"PROCESSING_INTERVAL": "9"}, dotenv=dotenv)
    assert (s.batch_size, s.processing_interval) == (123, 9)
    dotenv.write_text("BATCH_SIZE=abc\n")
    with pytest.raises(SettingsError, match="BATCH_SIZE"):
        Settings.from_env({}, dotenv=dotenv)


def template_keys(text: str) -> list[str]:
    """Keys of `KEY=value` lines, including commented-out examples such as `# S3_ENDPOINT_URL=`."""
    return re.findall(r"^[ \t]*(?:#[ \t]*)?([A-Z][A-Z0-9_]*)[ \t]*=", text, flags=re.MULTILINE)


def test_env_template_documents_exactly_the_settings():
    template = ROOT / ".env.template"
    assert template.is_file(), ".env.template is missing"
    keys = template_keys(template.read_text(encoding="utf-8"))
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    assert not duplicates, f".env.template lists these keys twice: {duplicates}"
    names = set(Settings.env_names())
    assert len(names) == len(Settings.env_names())
    assert sorted(names - set(keys)) == [], "settings missing from .env.template"
    assert sorted(set(keys) - names) == [], ".env.template keys that no setting reads"
    # and the template as written is a valid configuration (placeholders would stop the program)
    from dotenv import dotenv_values

    values = {k: v for k, v in dotenv_values(template).items() if v is not None}
    Settings.from_env(values, dotenv=NO_DOTENV)


def test_template_parser_reads_set_and_commented_keys():
    text = "# Lake\nS3_BUCKET_NAME=\n#S3_ENDPOINT_URL=http://127.0.0.1:9000\n  # BATCH_SIZE = 10000\n# a note: x=y\n"
    assert template_keys(text) == ["S3_BUCKET_NAME", "S3_ENDPOINT_URL", "BATCH_SIZE"]


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("entry", [["main.py"], ["-m", "src.mechanism_x.data_ingestion"]])
def test_help_exits_0_and_mentions_drain(entry):
    out = run([*entry, "--help"], clean_env())
    assert out.returncode == 0, out.stderr
    assert "--drain" in out.stdout and "usage:" in out.stdout


@pytest.mark.parametrize("entry", [["main.py"], ["-m", "src.mechanism_x.data_ingestion"]])
def test_bad_setting_stops_the_program_with_one_line(entry, tmp_path):
    env = clean_env(BATCH_SIZE="abc", DATA_DIR=str(tmp_path / "data"), LOCAL_INBOX_DIR=str(tmp_path / "inbox"))
    out = run(entry, env)
    assert out.returncode == 2
    lines = [line for line in (out.stderr + out.stdout).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "BATCH_SIZE" in lines[0] and "abc" in lines[0]
    assert not (tmp_path / "data").exists() and not (tmp_path / "inbox").exists()


def test_driver_java_options_add_up_instead_of_replacing():
    """The JVM flags of spark_conf survive a caller's own -D options (the log layout), each option once."""
    from config.spark_config import DRIVER_JAVA_OPTIONS, JAVA_OPTIONS_KEY, merged_conf

    base = {JAVA_OPTIONS_KEY: DRIVER_JAVA_OPTIONS, "spark.app.name": "a"}
    extra = {JAVA_OPTIONS_KEY: f"-Dlog4j2.configurationFile=x {DRIVER_JAVA_OPTIONS}", "spark.app.name": "b"}
    assert merged_conf(base, extra) == {
        JAVA_OPTIONS_KEY: f"{DRIVER_JAVA_OPTIONS} -Dlog4j2.configurationFile=x",
        "spark.app.name": "b",
    }
    assert merged_conf({"spark.app.name": "a"}, None) == {"spark.app.name": "a"}


@pytest.mark.parametrize(
    ("setting", "until_stopped", "resolved", "flag"),
    [
        ("auto", True, "tiered", "-XX:+TieredCompilation"),
        ("auto", False, "c1", "-XX:TieredStopAtLevel=1"),
        ("c1", True, "c1", "-XX:TieredStopAtLevel=1"),
        ("tiered", False, "tiered", "-XX:+TieredCompilation"),
    ],
)
def test_the_driver_jit_is_tiered_for_a_y_that_runs_until_stopped_unless_set(
    make_settings, setting, until_stopped, resolved, flag
):
    from config.spark_config import DRIVER_JAVA_OPTIONS, JAVA_OPTIONS_KEY, resolve_jit, spark_conf

    settings = resolve_jit(make_settings(SPARK_DRIVER_JIT=setting), runs_until_stopped=until_stopped)
    assert settings.spark_driver_jit == resolved
    options = spark_conf(settings, "t")[JAVA_OPTIONS_KEY].split()
    assert options == [flag, *DRIVER_JAVA_OPTIONS.split()]
    assert "TieredStopAtLevel" not in DRIVER_JAVA_OPTIONS  # the class archive's key: the same under either compiler
    # a session whose caller says nothing (tests, anchors, the archive's build) compiles with C1 only
    assert (
        spark_conf(make_settings(SPARK_DRIVER_JIT="auto"), "t")[JAVA_OPTIONS_KEY].split()[0]
        == "-XX:TieredStopAtLevel=1"
    )


@pytest.mark.parametrize(("drain", "handed"), [(True, "c1"), (False, "auto")])
def test_the_supervisor_hands_a_drains_workers_c1(tmp_path, make_settings, drain, handed):
    """Under `main.py --drain` Y runs without `--drain` of its own (it learns of the end from the supervisor's mark),
    so the supervisor resolves SPARK_DRIVER_JIT=auto for it; the daemon's Y resolves it itself (tiered)."""
    from main import Supervisor

    settings = make_settings(DATA_DIR=str(tmp_path / "data"), METRICS_ADDR="off")
    assert Supervisor(settings, drain=drain).env["SPARK_DRIVER_JIT"] == handed
    set_by_user = make_settings(DATA_DIR=str(tmp_path / "data"), METRICS_ADDR="off", SPARK_DRIVER_JIT="tiered")
    assert Supervisor(set_by_user, drain=drain).env["SPARK_DRIVER_JIT"] == "tiered"

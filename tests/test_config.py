"""Settings: SPEC §6 defaults, one-line errors naming the variable, masked secrets, `.env.template` in step."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from config.config import PROJECT_ROOT, Settings
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


@pytest.mark.parametrize(
    "name, value, words",
    [
        ("BATCH_SIZE", "abc", ["'abc'", "whole number"]),
        ("BATCH_SIZE", "0", ["out of range"]),
        ("BATCH_SIZE", "-5", ["out of range"]),
        ("BATCH_SIZE", "1.5", ["whole number"]),
        ("CHUNK_INTERVAL_SECONDS", "-1", ["out of range", ">= 0"]),
        ("CHUNK_INTERVAL_SECONDS", "soon", ["not a number"]),
        ("CHUNK_INTERVAL_SECONDS", "nan", ["finite"]),
        ("PROCESSING_INTERVAL", "0", ["out of range", "> 0"]),
        ("PROCESSING_INTERVAL", "-30", ["out of range"]),
        ("POSTGRES_PORT", "99999", ["out of range"]),
        ("MAX_WORKERS", "0", ["out of range"]),
        ("DETECTIONS_PER_FILE", "fifty", ["whole number"]),
        ("DETECTIONS_FLUSH_SECONDS", "0", ["out of range"]),
        ("PATID1_COUNT_PERCENTILE", "1.5", ["out of range"]),
        ("PATID1_WEIGHT_PERCENTILE", "-0.1", ["out of range"]),
        ("PATID2_MIN_TXNS", "-1", ["out of range"]),
        ("S3_ENDPOINT_URL", "ftp://minio:9000", ["URL"]),
        ("LOG_LEVEL", "verbose", ["'verbose'"]),
        ("SPARK_DRIVER_MEMORY", "lots", ["memory"]),
    ],
)
def test_bad_value_is_one_line_naming_the_variable(name, value, words):
    message = settings_error(**{name: value})
    assert name in message
    for word in words:
        assert word in message, (message, word)


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


@pytest.mark.parametrize("name", ["POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY"])
def test_placeholder_secret_is_refused(name):
    env = {name: "changeme"}
    if name == "AWS_SECRET_ACCESS_KEY":
        env["AWS_ACCESS_KEY_ID"] = "AKIAEXAMPLE"
    message = settings_error(**env)
    assert name in message and "changeme" not in message


def test_aws_keys_come_in_pairs():
    message = settings_error(AWS_ACCESS_KEY_ID="AKIAEXAMPLE")
    assert "AWS_ACCESS_KEY_ID" in message and "AWS_SECRET_ACCESS_KEY" in message


def test_secrets_are_masked_when_printed_or_logged():
    secrets = {
        "POSTGRES_PASSWORD": "pg-pass-Zq81",
        "AWS_ACCESS_KEY_ID": "AKIA-ID-Xy12",
        "AWS_SECRET_ACCESS_KEY": "aws-secret-Wv55",
    }
    s = build(**secrets, POSTGRES_HOST="db")
    shown = [repr(s), str(s), str(s.describe()), repr(s.describe()), f"{s}", f"{s.postgres_password}"]
    for text in shown:
        for value in secrets.values():
            assert value not in text
    described = s.describe()
    assert set(described) == set(Settings.env_names())
    for name in secrets:
        assert "*" in described[name]
    assert described["POSTGRES_HOST"] == "db"
    # the real values are still there for the code that needs them
    assert s.postgres_password.get() == "pg-pass-Zq81"
    assert s.to_env()["AWS_SECRET_ACCESS_KEY"] == "aws-secret-Wv55"


def test_to_env_reproduces_the_settings_in_a_child():
    s = build(BATCH_SIZE="7", POSTGRES_PASSWORD="pw-123", SPARK_UI_ENABLED="true", S3_BUCKET_NAME="b")
    assert Settings.from_env(s.to_env(), dotenv=NO_DOTENV) == s


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

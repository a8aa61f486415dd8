"""The one logging set-up (src/observability/logs.py): JSON lines, UTC timestamps, escaping, rotation, Spark's JVM."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_json_lines_carry_utc_time_worker_and_correlation_fields_even_in_a_far_time_zone():
    out = _run(
        """
        import logging, time
        from src.observability.logs import configure_logging, spark_logging_conf
        configure_logging({"log_level": "INFO", "log_format": "json"}, "supervisor")  # stdout left alone
        before = time.time()
        logging.getLogger("src.mechanism_x").info(
            "chunk %s written", "f-000001\\n{\\"level\\": \\"ERROR\\"}",
            extra={"event": "chunk_written", "file_id": "f", "chunk_id": 7, "chunk_seq": 1, "batch_id": None},
        )
        try:
            1 / 0
        except ZeroDivisionError:
            logging.getLogger("y").exception("boom")
        print(before, flush=True)
        """,
        env={"TZ": "Asia/Kolkata"},
    )
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 2, out.stderr  # the newline in the argument did not make a second line
    first = records[0]
    assert first["worker"] == "supervisor" and first["event"] == "chunk_written" and first["level"] == "INFO"
    assert first["file_id"] == "f" and first["chunk_id"] == 7 and first["chunk_seq"] == 1
    assert "batch_id" not in first
    assert first["message"] == 'chunk f-000001\n{"level": "ERROR"} written'
    assert isinstance(first["pid"], int) and first["logger"] == "src.mechanism_x"
    # UTC, not the local (+05:30) clock stamped as UTC.
    stamped = datetime.strptime(first["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    before = float(out.stdout.strip())
    assert abs(stamped.timestamp() - before) < 5, (first["ts"], before)
    assert "ZeroDivisionError" in records[1]["exc"] and records[1]["event"] == "y"


def test_text_lines_escape_control_characters_so_a_file_name_cannot_forge_a_line():
    out = _run(
        """
        import logging
        from src.observability.logs import configure_logging, spark_logging_conf
        configure_logging({"log_level": "INFO", "log_format": "text"}, "supervisor")
        logging.getLogger("m").warning("file %s ignored", "a.csv\\n2026-01-01T00:00:00.000Z 1 supervisor ERROR x: forged\\u2028")
        """
    )
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].endswith("forged\\u2028 ignored")
    assert " supervisor WARNING m: file a.csv\\n2026" in lines[0]


def test_a_worker_configured_twice_logs_each_record_once_and_wraps_stray_output():
    out = _run(
        """
        import logging, os
        from src.observability.logs import configure_logging, spark_logging_conf
        configure_logging({"log_level": "INFO", "log_format": "json"}, "mechanism_x")
        configure_logging({"log_level": "INFO", "log_format": "json"}, "mechanism_x")
        logging.getLogger("a").info("once")
        os.write(2, b"raw bytes on fd 2\\n")
        """,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stderr.splitlines()]
    assert [r["message"] for r in records] == ["once", "raw bytes on fd 2"], out.stderr
    assert records[1]["event"] == "stray_output" and records[1]["worker"] == "mechanism_x"


def test_log_file_rotates_by_size_with_gzipped_backups_shared_by_several_processes(tmp_path):
    log_file = tmp_path / "logs" / "tp.log"
    code = f"""
        import logging, sys
        from src.observability.logs import configure_logging, spark_logging_conf
        configure_logging({{"log_level": "INFO", "log_format": "json", "log_file": {str(log_file)!r},
                           "log_file_max_bytes": 4096, "log_file_backups": 500}}, sys.argv[1])
        for i in range(400):
            logging.getLogger("w").info("line %d of %s", i, sys.argv[1], extra={{"chunk_id": i}})
        """
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), name],
            cwd=ROOT,
            env=env,
            stderr=subprocess.DEVNULL,
        )
        for name in ("mechanism_x", "mechanism_y")
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    backups = sorted(log_file.parent.glob("tp.log.*.gz"))
    assert len(backups) >= 5, list(log_file.parent.iterdir())
    lines = log_file.read_text().splitlines()
    for b in backups:
        lines += gzip.decompress(b.read_bytes()).decode().splitlines()
    records = [json.loads(line) for line in lines]
    seen = {(r["worker"], r["chunk_id"]) for r in records}
    assert len(records) == 800 and len(seen) == 800  # every line once, none lost or torn by a rotation


@pytest.mark.slow
def test_spark_session_in_json_mode_prints_nothing_but_json(tmp_path):
    out = _run(
        f"""
        import logging
        from config.config import Settings
        from src.observability.logs import configure_logging, spark_logging_conf
        settings = Settings.from_env({{"SPARK_MASTER": "local[1]", "DATA_DIR": {str(tmp_path)!r}, "LOG_FORMAT": "json"}},
                                     dotenv=None)
        configure_logging(settings, "mechanism_y")
        from src.utils.spark_utils import start_session
        spark = start_session(settings, "log-test", extra_conf=spark_logging_conf(settings))
        spark.sparkContext._jvm.org.apache.logging.log4j.LogManager.getLogger("tp.test").warn("from the jvm\\nsecond")
        print("a stray print")
        assert spark.range(5).count() == 5
        spark.stop()
        """,
        env={"SPARK_LOCAL_IP": "127.0.0.1"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line JSON: banners and JVM warnings included
    assert all(r["worker"] == "mechanism_y" and r["ts"].endswith("Z") for r in records), lines
    jvm = [r for r in records if r["logger"] == "tp.test"]
    assert jvm and jvm[0]["level"] == "WARNING" and jvm[0]["event"] == "spark_jvm"
    assert jvm[0]["message"] == "from the jvm\nsecond"
    assert any(r["message"] == "a stray print" and r["event"] == "stray_output" for r in records)
    assert not any("Setting default log level" in r["message"] for r in records)


@pytest.mark.slow
def test_spark_jvm_lines_in_text_mode_share_the_python_layout(tmp_path):
    out = _run(
        f"""
        from config.config import Settings
        from src.observability.logs import configure_logging, spark_logging_conf
        settings = Settings.from_env({{"SPARK_MASTER": "local[1]", "DATA_DIR": {str(tmp_path)!r}, "LOG_FORMAT": "text"}},
                                     dotenv=None)
        configure_logging(settings, "mechanism_y")
        from src.utils.spark_utils import start_session
        spark = start_session(settings, "log-test", extra_conf=spark_logging_conf(settings))
        spark.sparkContext._jvm.org.apache.logging.log4j.LogManager.getLogger("tp.test").warn("from the jvm\\nsecond")
        spark.stop()
        """,
        env={"SPARK_LOCAL_IP": "127.0.0.1"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    layout = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \d+ mechanism_y (INFO|WARNING|ERROR) \S+: "
    jvm = [line for line in out.stderr.splitlines() if " tp.test: " in line]
    assert len(jvm) == 1 and re.match(layout, jvm[0]) and jvm[0].endswith("from the jvm\\nsecond"), out.stderr
    python = [line for line in out.stderr.splitlines() if "session up" in line]
    assert python and re.match(layout, python[0]), out.stderr
    assert "Setting default log level" not in out.stderr and "log4j profile" not in out.stderr

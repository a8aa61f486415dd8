"""The zip for `spark-submit --py-files` (src/packaging.py): what it holds, and the code reading its data files from
it when imported from the zip alone, in a directory that is not the checkout. No Spark here: the spark-submit run
itself is tests/test_spark_submit.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from src.packaging import build_zip, members

ROOT = Path(__file__).resolve().parent.parent
DATA = ["config/log4j2-json.properties", "config/log4j2-text.properties", "setup/create_missing_tables.sql",
        "setup/postgres_setup.sql"]  # fmt: skip

PROBE = """
import json, sys
from config.config import PROJECT_ROOT
from src.errors import ProcessorError
from src.packaging import project_file, project_file_uri
from src.utils.db import SCHEMA_FILES
try:
    project_file("setup/missing.sql")
    missing = None
except ProcessorError as exc:
    missing = str(exc)
json.dump({
    "root": str(PROJECT_ROOT),
    "schema": [project_file(name).decode() for name in SCHEMA_FILES],
    "uri": project_file_uri("config/log4j2-json.properties"),
    "src": sys.modules["src"].__file__,
    "missing": missing,
}, sys.stdout)
"""


def test_the_zip_holds_the_packages_and_the_data_files_at_their_checkout_paths(tmp_path):
    out = build_zip(tmp_path / "dist" / "tp.zip")
    names = zipfile.ZipFile(out).namelist()
    assert names == members(ROOT) and len(names) == len(set(names))
    assert set(DATA) <= set(names)
    assert {"src/__init__.py", "config/__init__.py", "src/mechanism_y/stream_processor.py"} <= set(names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or n.startswith(("tests/", "data/"))]
    assert build_zip(tmp_path / "again.zip").read_bytes() == out.read_bytes(), "the same code, the same bytes"


def test_code_imported_from_the_zip_reads_its_sql_and_log_layout_from_it(tmp_path):
    out = build_zip(tmp_path / "tp.zip")
    elsewhere = tmp_path / "run"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(out)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    assert got["src"] == f"{out}/src/__init__.py", "imported from the zip, not from the checkout"
    assert got["root"] == str(elsewhere.resolve()), ".env and relative paths: the launch directory"
    assert got["schema"] == [
        (ROOT / "setup" / n).read_text() for n in ("postgres_setup.sql", "create_missing_tables.sql")
    ]
    assert got["uri"] == f"jar:{out.resolve().as_uri()}!/config/log4j2-json.properties"
    assert got["missing"].startswith(f"setup/missing.sql is missing from {out}")
    assert "\n" not in got["missing"] and "python -m src.packaging" in got["missing"]

"""Every shell command in README.md is either run here, offline, or listed below with the reason it is not.

A command added to the README that is neither run nor listed fails `test_every_readme_command_is_classified`,
so the README cannot drift into commands nobody has tried. The runnable ones run in a copy of the project
in a temporary directory, so they cannot touch the working tree's `data/`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SHELL_LANGUAGES = {"bash", "sh", "console", "shell"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[A-Za-z0-9_-]*)[ \t]*$")

# Commands run by this test (exit 0 expected), with what else they must have produced, if anything.
RUNNABLE: dict[str, str] = {
    "python main.py --help": "",
    "python -m src.mechanism_x.data_ingestion --help": "",
    "python -m src.mechanism_y.stream_processor --help": "",
    "python -m src.sample_data --rows 1000 --seed 1 --out data/sample": "data/sample/transactions.csv",
    "ruff check . && ruff format --check .": "",
    "python -m src.packaging --out dist/transaction-processor.zip": "dist/transaction-processor.zip",
}

# Commands not run here, each with the reason.
NOT_RUNNABLE: dict[str, str] = {
    "pip install -r requirements.txt && python main.py": "installs packages, then runs the daemon until stopped",
    "pip install -r requirements-dev.txt && pytest": "installs packages, then runs the whole suite (this test too)",
    'pytest -m "not slow"': "runs the fast suite, this test included",
    "python main.py psql": "interactive, and needs the daemon's database (a PostgreSQL server)",
    "python main.py status": "needs the daemon's database (a PostgreSQL server)",
    "docker run -d --name minio -p 127.0.0.1:9000:9000 -p 127.0.0.1:9001:9001 "
    '-e MINIO_ROOT_USER=lakeadmin -e MINIO_ROOT_PASSWORD="$(openssl rand -hex 16)" '
    "quay.io/minio/minio server /data --console-address :9001": "needs Docker and a MinIO image from the internet",
    "export S3_BUCKET_NAME=lake S3_ENDPOINT_URL=http://127.0.0.1:9000 AWS_REGION=us-east-1": (
        "part of the MinIO walk-through: only meaningful with the MinIO server above"
    ),
    "export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...": "placeholders for real credentials",
    "python main.py": "the daemon: runs until stopped (and here needs the MinIO server above)",
    "python bench/ingest.py": "benchmark, about a minute of full CPU",
    "python bench/detect.py": "benchmark: a full end-to-end run on the 594,643-row sample",
    "python bench/detect.py --rows 3000000": "benchmark: 3 million rows, many minutes",
    "python bench/detect.py --interval 1": "benchmark at the default pace, many minutes",
    "python bench/detect.py --interval 1 --daemon": "benchmark at the default pace on the daemon, many minutes",
    "python -m bench.s3": "benchmark against an S3 server",
    "python bench/commit_growth.py": "benchmark: fills a table to 30 million rows, minutes",
    "unzip -o transaction-processor.zip src/mechanism_y/stream_processor.py": (
        "part of the spark-submit walk-through: run where the zip was copied (tests/test_spark_submit.py does it)"
    ),
    'spark-submit --master spark://10.0.0.5:7077 --driver-class-path "/opt/tp/jars/*" --py-files '
    "transaction-processor.zip src/mechanism_y/stream_processor.py --drain": (
        "needs a Spark cluster, a lake and a database: tests/test_spark_submit.py runs it on a loopback cluster"
    ),
}


def _strip_comment(line: str) -> str:
    """Drop a shell comment: a `#` at the start or after whitespace, outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def shell_blocks(text: str) -> list[tuple[int, str, list[str]]]:
    """(line number, language, lines) of every fenced shell block, indented ones (inside lists) included."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, indent, lang = i + 1, m["indent"], m["lang"].lower()
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        if lang in SHELL_LANGUAGES:
            blocks.append((start, lang, body))
    return blocks


def commands(lang: str, body: list[str]) -> list[str]:
    """The commands of one block: continuations joined, comments and blank lines dropped, `$ ` prompts read."""
    out, pending = [], ""
    for raw in body:
        if lang == "console":
            if not raw.startswith("$ ") and not pending:
                continue  # output shown in a console block
            raw = raw[2:] if raw.startswith("$ ") else raw
        line = pending + raw
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        command = " ".join(_strip_comment(line).split())
        if command:
            out.append(command)
    assert not pending, f"README block ends inside a continued line: {pending!r}"
    return out


def readme_commands() -> list[tuple[int, str]]:
    return [(start, c) for start, lang, body in shell_blocks(README.read_text()) for c in commands(lang, body)]


def test_every_readme_command_is_classified():
    found = readme_commands()
    assert found, "no shell block found in README.md: has the fence syntax changed?"
    unknown = [f"README.md:{line}: {c}" for line, c in found if c not in RUNNABLE and c not in NOT_RUNNABLE]
    assert not unknown, (
        "README commands neither run nor listed in tests/test_readme.py (add each to RUNNABLE, or to "
        "NOT_RUNNABLE with the reason): " + "; ".join(unknown)
    )
    present = {c for _, c in found}
    stale = sorted((set(RUNNABLE) | set(NOT_RUNNABLE)) - present)
    assert not stale, f"listed in tests/test_readme.py but no longer in README.md: {stale}"


def test_the_command_parser_reads_continuations_comments_and_prompts():
    text = "x\n  ```bash\n  a \\\n    --b 'c # d'  # note\n  # only a comment\n  ```\n```console\n$ e\noutput\n```\n"
    found = [c for _, lang, body in shell_blocks(text) for c in commands(lang, body)]
    assert found == ["a --b 'c # d'", "e"]


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory) -> Path:
    """The project without its data, caches and git, so a command cannot write into the working tree."""
    dest = tmp_path_factory.mktemp("readme") / "project"
    # .coverage.*: the data files other processes of this very run write and remove while the copy walks the tree
    ignore = shutil.ignore_patterns(
        ".git", "data", "out", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info", ".coverage*", "htmlcov"
    )
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def _offline_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("POSTGRES_", "S3_", "AWS_", "GDRIVE_", "TP_", "PYTHON"))
    }
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


@pytest.mark.parametrize("command", sorted(RUNNABLE))
def test_readme_command_runs_offline(command, project_copy):
    assert command in {c for _, c in readme_commands()}, f"{command!r} is no longer in README.md"
    proc = subprocess.run(
        ["bash", "-c", command],
        cwd=project_copy,
        env=_offline_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"{command!r} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}"
    if RUNNABLE[command]:
        produced = project_copy / RUNNABLE[command]
        assert produced.is_file() and produced.stat().st_size > 0, f"{command!r} did not write {produced}"


LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


@pytest.mark.parametrize(
    "page", ["README.md", "CONTRIBUTING.md", *sorted(p.name for p in (ROOT / "docs").glob("*.md"))]
)
def test_links_stay_inside_the_repository_and_resolve(page):
    path = ROOT / page if (ROOT / page).exists() else ROOT / "docs" / page
    broken = []
    for m in LINK.finditer(path.read_text()):
        target = m["target"].split("#", 1)[0]
        if not target:
            continue  # an anchor on the same page
        if re.match(r"^[a-z]+:", target):
            broken.append(f"{m['target']} (outside the repository)")
            continue
        resolved = (path.parent / target).resolve()
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            broken.append(f"{m['target']} (no such file in the repository)")
    assert not broken, f"{path.relative_to(ROOT)}: " + "; ".join(broken)

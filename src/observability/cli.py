"""`python main.py status` and `python main.py psql`: the operator's terminal view of the daemon's database.

Both read the same settings as the daemon and reach the same database: the server named by POSTGRES_*,
or the embedded one under DATA_DIR (attached to if the daemon runs, started if it does not).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TextIO
from urllib.parse import quote

EXIT_OK = 0
EXIT_FAILING = 1
EXIT_CONFIG = 2

STATUS_HELP = (
    "print the pipeline's summary from PostgreSQL (throughput, backlog, latency, detections, files, failures, "
    "what the daemon waits for), whether or not the daemon runs; exit 1 when something is failing "
    "(a failed or conflicting file, a failed chunk, an ERROR logged in the last 15 minutes) or the database "
    "cannot be read, 2 on a settings error"
)
PSQL_HELP = (
    "run psql on the daemon's database (embedded or POSTGRES_*; the password goes through PGPASSWORD, never "
    "the command line); other arguments are passed to psql (put them after -- if they clash with ours)"
)


def add_commands(parser: argparse.ArgumentParser) -> None:
    """Register the `status` and `psql` subcommands on main.py's parser."""
    sub = parser.add_subparsers(
        dest="command", title="commands (instead of running the daemon)", metavar="{status,psql}"
    )
    status = sub.add_parser("status", help=STATUS_HELP, description=STATUS_HELP)
    status.add_argument("--json", action="store_true", help="print the summary as JSON (as /api/status serves it)")
    psql = sub.add_parser("psql", help=PSQL_HELP, description=PSQL_HELP)
    psql.add_argument(
        "--print-url", action="store_true", help="print the connection URL (password masked) instead of running psql"
    )


def run_command(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """Run the subcommand main.py parsed; `extra` are the arguments argparse did not know (psql's)."""
    from config.config import Settings
    from src.errors import ProcessorError

    if args.command != "psql" and extra:
        print(f"error: unrecognized arguments: {' '.join(extra)}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        settings = Settings.from_env()
    except ProcessorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "status":
        return status_command(settings, as_json=args.json)
    psql_args = list(extra[1:] if extra[:1] == ["--"] else extra)
    return psql_command(settings, psql_args, print_url=args.print_url)


# ---------------------------------------------------------------- status


def status_command(settings: Any, *, as_json: bool = False, out: TextIO | None = None) -> int:
    """Print the summary; 0 when nothing is failing, 1 otherwise (or when the database cannot be read)."""
    import psycopg2

    from src.errors import ProcessorError
    from src.observability.status import collect_status, describe_target

    out = out or sys.stdout
    try:
        status = collect_status(settings)
    except psycopg2.errors.UndefinedTable:
        print(f"no ledger in {describe_target(settings)}: the daemon has not run against this database yet", file=out)
        return EXIT_OK
    except (ProcessorError, psycopg2.Error) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: cannot read the status from {describe_target(settings)}: {reason}", file=sys.stderr)
        return EXIT_FAILING
    if as_json:
        json.dump(status, out, indent=2)
        out.write("\n")
    else:
        out.write(render_status(status))
    return EXIT_FAILING if status["problems"] else EXIT_OK


def render_status(status: dict[str, Any]) -> str:
    """The summary as plain-text tables, one per section (the page's sections, in the same order)."""
    t = status["totals"]
    lat = status["latency"]
    parts = [
        f"Pipeline status at {status['generated_at']}",
        _section(
            "Summary",
            ["what", "value"],
            [
                ["chunks written / processed", f"{t['chunks_written']} / {t['chunks_processed']}"],
                ["rows ingested / quarantined", f"{t['rows_ingested']} / {t['rows_quarantined']}"],
                ["backlog (written, not processed)", t["backlog_chunks"]],
                ["pending / failed chunks", f"{t['pending_chunks']} / {t['failed_chunks']}"],
                ["detections", t["detections"]],
                ["files by status", ", ".join(f"{k} {v}" for k, v in sorted(status["files_by_status"].items()))],
                [
                    "latency p50 / p95 (written -> processed)",
                    f"{_secs(lat['p50_seconds'])} / {_secs(lat['p95_seconds'])}",
                ],
            ],
        ),
        _section("Waiting for", ["now"], [[w] for w in status["waiting_for"]]),
        _section(
            f"Throughput per minute (last {status['window_minutes']} min, minutes with activity)",
            ["minute (UTC)", "chunks in", "rows in", "chunks done", "rows done", "backlog"],
            [
                [
                    s["t"][11:16],
                    s["ingested_chunks"],
                    s["ingested_rows"],
                    s["processed_chunks"],
                    s["processed_rows"],
                    s["backlog_chunks"],
                ]
                for s in status["series"]
                if s["ingested_chunks"] or s["processed_chunks"] or s["backlog_chunks"]
            ][-15:],
        ),
        _section(
            "Detections per pattern",
            ["pattern", "total", f"last {status['window_minutes']} min"],
            _detection_rows(status["detections"]),
        ),
        _section(
            "Files",
            ["name", "kind", "status", "rows", "quarantined", "chunks", "reason"],
            [
                [
                    f["name"],
                    f["kind"],
                    f["status"],
                    f["rows_ingested"],
                    f["rows_quarantined"],
                    f["chunks"],
                    f["reason"] or "",
                ]
                for f in status["files"]
            ],
        ),
        _section(
            "Last detections",
            ["id", "pattern", "action", "customer", "merchant", "detected (UTC)", "chunk"],
            [
                [
                    d["id"],
                    d["pattern_id"],
                    d["action_type"],
                    d["customer_name"],
                    d["merchant_id"],
                    d["detection_time"],
                    d["chunk_id"],
                ]
                for d in status["last_detections"]
            ],
        ),
        _section(
            "Who works (two daemons: Y's leader, X's file leases)",
            ["role", "holder", "detail"],
            _leadership_rows(status["leadership"]),
        ),
        _section(
            "Last failures (processing_logs ERROR)",
            ["when (UTC)", "component", "event", "file", "chunk", "message"],
            [
                [e["logged_at"], e["component"], e["event"], e["file_id"] or "", e["chunk_id"] or "", e["message"]]
                for e in status["failures"]["errors"]
            ],
        ),
        _section(
            "Failed chunks",
            ["chunk", "file", "#", "lines"],
            [
                [c["seq"], c["name"], c["chunk_seq"], f"{c['first_line']}-{c['last_line']}"]
                for c in status["failures"]["failed_chunks"]
            ],
        ),
        _section(
            "Problems",
            ["failing now"],
            [[p] for p in status["problems"]] or [["none: nothing is failing"]],
        ),
    ]
    return "\n".join(parts) + "\n"


def _leadership_rows(who: dict[str, Any]) -> list[list[Any]]:
    leader = who["y_leader"]
    rows = [
        ["Y leader", leader["holder"], f"term {leader['term']} since {leader['since']}"]
        if leader
        else ["Y leader", "none yet", ""]
    ]
    rows += [
        ["X lease", lease["holder"], f"{lease['file_id']}, renewal due within {lease['expires_in_seconds']:.0f} s"]
        for lease in who["leases"]
    ]
    rows.append(["lease takeovers", who["lease_takeovers"], "files taken from an X that stopped renewing"])
    return rows


def _detection_rows(detections: dict[str, Any]) -> list[list[Any]]:
    recent: dict[str, int] = {}
    for point in detections["series"]:
        recent[point["pattern_id"]] = recent.get(point["pattern_id"], 0) + point["count"]
    return [[p, n, recent.get(p, 0)] for p, n in sorted(detections["by_pattern"].items())]


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def _section(title: str, header: list[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[_cell(v) for v in r] for r in rows]
    lines = [f"\n== {title} =="]
    if not rows:
        return "\n".join(lines + ["(none)"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt: Callable[[Sequence[str]], str] = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) for c, w in zip(cells, widths)
    ).rstrip()
    lines += [fmt(header), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def _cell(value: Any, limit: int = 120) -> str:
    """One printable line: control characters escaped (file names are untrusted), long text cut."""
    text = "" if value is None else str(value)
    text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------- psql


def connection_params(settings: Any) -> dict[str, str]:
    """libpq parameters of the daemon's database (host, port, dbname, user, password, ...)."""
    import psycopg2.extensions

    from src.observability.status import connection_kwargs

    kwargs = connection_kwargs(settings)
    if "dsn" in kwargs:
        return {k: str(v) for k, v in psycopg2.extensions.parse_dsn(kwargs["dsn"]).items() if v not in (None, "")}
    return {k: str(v) for k, v in kwargs.items() if v not in (None, "") and k != "connect_timeout"}


_PG_ENV = {
    "host": "PGHOST",
    "port": "PGPORT",
    "dbname": "PGDATABASE",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "sslmode": "PGSSLMODE",
    "application_name": "PGAPPNAME",
    "connect_timeout": "PGCONNECT_TIMEOUT",
}


def masked_url(params: dict[str, str]) -> str:
    """postgresql://user:****@host:port/db — what to paste into a client, without the secret."""
    user = quote(params.get("user", ""), safe="")
    auth = f"{user}:****@" if params.get("password") else (f"{user}@" if user else "")
    host = params.get("host", "")
    query = ""
    if host.startswith("/"):  # a Unix socket directory (the embedded server)
        query, host = f"?host={quote(host, safe='/')}", ""
    port = f":{params['port']}" if params.get("port") and host else ""
    if params.get("port") and query:
        query += f"&port={params['port']}"
    return f"postgresql://{auth}{host}{port}/{quote(params.get('dbname', ''), safe='')}{query}"


def psql_env(params: dict[str, str], base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for key, value in params.items():
        if key in _PG_ENV:
            env[_PG_ENV[key]] = value
    return env


def psql_command(settings: Any, args: list[str], *, print_url: bool = False) -> int:
    """Run psql on the daemon's database (its exit code is ours), or print its URL with the password masked."""
    from src.errors import ProcessorError

    try:
        params = connection_params(settings)
    except ProcessorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILING
    if print_url:
        print(masked_url(params))
        return EXIT_OK
    exe = find_psql()
    if exe is None:
        print(
            "error: psql not found: install the PostgreSQL client (apt-get install postgresql-client)", file=sys.stderr
        )
        return EXIT_FAILING
    # A child rather than exec: when this command started the embedded server, it is stopped again when
    # psql ends (pgserver's exit hook); Ctrl-C belongs to psql meanwhile.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # The operator's own psql arguments, run as the operator: nothing here is untrusted input.
        return subprocess.run([exe, *args], env=psql_env(params)).returncode  # noqa: S603
    finally:
        signal.signal(signal.SIGINT, previous)


def find_psql() -> str | None:
    found = shutil.which("psql")
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin/psql"), reverse=True):
        return str(candidate)
    try:
        import pgserver

        bundled = Path(pgserver.__file__).parent / "pginstall" / "bin" / "psql"
        return str(bundled) if bundled.exists() else None
    except ImportError:
        return None

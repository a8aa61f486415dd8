"""The code as one zip for `spark-submit --py-files`, and how the code reads the data files it ships.

Spark users launch a job as `spark-submit --py-files <zip> <script>`: the driver then imports `src` and
`config` from the zip, where no file of the checkout can be opened by path. The zip holds the two packages
and the data files the code reads at run time, each at its path in the checkout (`setup/*.sql`,
`config/log4j2-*.properties`), so every file keeps the one place users know. The code reads them through
the import loader of its own `config` package (`project_file`), which reads a file of a checkout and a
member of a zip alike.

    python -m src.packaging --out dist/transaction-processor.zip

Under spark-submit the driver's JVM is up before Python runs, with spark-submit's `--master` and `--conf` as
its properties: `submitted_conf` reads them so the session keeps them, and `use_submitted_master` makes the
settings judge the master the session really has.
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
import zipimport
from pathlib import Path
from typing import Mapping

from src.errors import ProcessorError, SettingsError

PACKAGES = ("src", "config")
DATA_FILES = ("setup/*.sql", "config/log4j2-*.properties")
DEFAULT_OUT = "dist/transaction-processor.zip"
_FIXED_TIME = (2026, 1, 1, 0, 0, 0)  # the same code gives the same bytes, whenever it is packed
SUBMIT_GATEWAY_ENV = "PYSPARK_GATEWAY_PORT"  # set by spark-submit for the Python driver it launches
# Ours whatever spark-submit says: the app's name (it defaults to the script's), the checkpoints (the setting the
# start-up checks, SPARK_CHECKPOINT_DIR).
KEPT_OURS = frozenset({"spark.app.name", "spark.checkpoint.dir"})


def _home() -> tuple[str, object]:
    """Where the code was imported from (a checkout directory or a zip) and the loader that reads it."""
    import config

    return os.path.dirname(os.path.dirname(config.__file__)), config.__spec__.loader


def project_file(relpath: str) -> bytes:
    """The data file `relpath` (e.g. `setup/postgres_setup.sql`) of the checkout or zip the code runs from."""
    home, loader = _home()
    try:
        return loader.get_data(os.path.join(home, *relpath.split("/")))
    except OSError as exc:
        raise ProcessorError(
            f"{relpath} is missing from {home} ({type(exc).__name__}): use a complete checkout, or rebuild the "
            f"zip with `python -m src.packaging`"
        ) from None


def project_file_uri(relpath: str) -> str:
    """A URI the JVM can open for `relpath`: `file:` in a checkout, `jar:file:...!/` inside a zip."""
    home, loader = _home()
    if isinstance(loader, zipimport.zipimporter):
        return f"jar:{Path(home).resolve().as_uri()}!/{relpath}"
    return Path(home, *relpath.split("/")).resolve().as_uri()


def submitted_conf() -> dict[str, str]:
    """The Spark conf spark-submit launched this driver with (`--master`, `--conf`, spark-defaults.conf), else {}.

    The session's builder would override those JVM properties with the product's defaults (two shuffle
    partitions, say): the caller hands them back as its extra conf, so what the user submitted wins."""
    if SUBMIT_GATEWAY_ENV not in os.environ:
        return {}
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()  # connects to spark-submit's JVM (no JVM is started): SparkConf reads it
    return {key: value for key, value in SparkConf().getAll() if key not in KEPT_OURS}


def use_submitted_master(conf: Mapping[str, str]) -> None:
    """Make SPARK_MASTER spark-submit's `--master`, so the start-up checks (a local lake or checkpoint path on a
    cluster) judge the master the session really gets; a different SPARK_MASTER in the environment is refused."""
    master = conf.get("spark.master")
    if not master:
        return
    mine = os.environ.get("SPARK_MASTER")
    if mine and mine != master:
        raise SettingsError(
            f"SPARK_MASTER={mine} differs from spark-submit's --master {master}: unset SPARK_MASTER or give both "
            "the same master"
        )
    os.environ["SPARK_MASTER"] = master


def members(root: Path) -> list[str]:
    """What the zip holds, as paths relative to the checkout `root`: the packages' modules and the data files."""
    names: set[str] = set()
    for package in PACKAGES:
        names.update(p.relative_to(root).as_posix() for p in (root / package).rglob("*.py"))
    for pattern in DATA_FILES:
        found = sorted(root.glob(pattern))
        if not found:
            raise ProcessorError(f"no {pattern} under {root}: run this from a complete checkout")
        names.update(p.relative_to(root).as_posix() for p in found)
    return sorted(n for n in names if "__pycache__" not in n)


def build_zip(out: Path, root: Path | None = None) -> Path:
    """Write the zip of `root` (default: this checkout) to `out`, atomically, and return `out`."""
    root = root or Path(__file__).resolve().parent.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in members(root):
            info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, (root / name).read_bytes())
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m src.packaging",
        description="Pack src/, config/ and the data files they read (setup/*.sql, config/log4j2-*.properties) "
        "into one zip for `spark-submit --py-files` (docs/cluster.md).",
    )
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help=f"the zip to write (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    try:
        out = build_zip(args.out)
    except (ProcessorError, OSError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    sys.stdout.write(f"{out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

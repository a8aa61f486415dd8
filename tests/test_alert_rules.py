"""config/alerts.yml: valid Prometheus rules, each alert unit-tested firing and not firing (promtool)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"  # .ci/run installs Debian's prometheus package


def _promtool(*args: str) -> subprocess.CompletedProcess:
    assert Path(PROMTOOL).exists(), "promtool is missing: apt-get install prometheus (.ci/run does it)"
    return subprocess.run([PROMTOOL, *args], cwd=CONFIG, capture_output=True, text=True, timeout=120)


def test_rules_are_valid():
    out = _promtool("check", "rules", "alerts.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 7 rules found" in out.stdout


def test_rule_unit_tests_pass():
    out = _promtool("test", "rules", "alerts_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_is_tested_firing_and_not_firing():
    rules = yaml.safe_load((CONFIG / "alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert names == {
        "FileFailed",
        "DependencyDown",
        "BacklogGrowing",
        "WorkerRestarting",
        "NoChunkProcessed",
        "QuarantineRateHigh",
        "DataDirFillingUp",
    }
    cases = [c for t in yaml.safe_load((CONFIG / "alerts_test.yml").read_text())["tests"] for c in t["alert_rule_test"]]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert fires == names and quiet == names, (names - fires, names - quiet)

"""The storm benchmark keeps working: ``benchmarks/storm.py --quick`` with tiny durations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_storm_quick_runs_and_writes_results(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "storm.py"), "--quick",
           "--modes", "empty", "silent", "--mode-seconds", "1", "--storm-seconds", "2",
           "--liveness", "1", "--unhealthy-after", "0.5", "--outage-seconds", "1",
           "--outage-kinds", "unreachable", "restart", "--output-dir", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "storm.json").read_text())
    assert {"meta", "modes", "storm", "targets"} <= results.keys()
    assert set(results["modes"]) == {"empty", "silent"}
    for mode in results["modes"].values():
        assert {"rate_per_informer", "requests_per_informer", "health_false_after_s",
                "converged_after_end_s"} <= mode.keys()
    assert len(results["modes"]["silent"]["silent_noticed_s"]) == 2
    assert {"rate_per_informer", "converged_after_last_fault_s"} <= results["storm"].keys()
    assert [(o["kind"], o["seconds"]) for o in results["outages"]] == [
        ("unreachable", 1.0), ("restart", 1.0)]
    for outage in results["outages"]:
        assert {"list_watch_per_s", "readyz_per_s", "wakeups", "converged_after_end_s",
                "health_false_after_s"} <= outage.keys()
    assert all({"target", "goal", "measured", "met"} <= row.keys()
               for row in results["targets"])
    assert "| target | goal | measured | met |" in (tmp_path / "storm.md").read_text()

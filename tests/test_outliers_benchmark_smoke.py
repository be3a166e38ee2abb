"""The outlier benchmark keeps working: ``benchmarks/outliers.py --quick`` with tiny spells."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_outliers_quick_runs_and_writes_results(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "outliers.py"), "--quick",
           "--grace", "1", "--after-grace", "0.5", "--wedge-seconds", "1.5",
           "--slow-seconds", "1.5", "--crash-observe", "1", "--warmup", "0.5",
           "--output-dir", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "outliers.json").read_text())
    assert {"meta", "cases"} <= results.keys()
    assert set(results["cases"]) == {"node", "wedged", "slow", "crash"}
    for case, columns in results["cases"].items():
        assert set(columns) == {"without", "with"}
        for column in columns.values():
            if "n/a" in column:  # a build without the outlier policy
                continue
            assert {"requests", "failed_or_hung", "failed_by_cause", "to_bad_pods",
                    "last_request_to_bad_pods_s", "bad_pods_out_of_pod_view_s",
                    "max_ejected_share"} <= column.keys(), (case, column)
    assert "false_ejections" in results["cases"]["slow"]["without"]
    assert "readmitted_after_recovery_s" in results["cases"]["node"]["without"]
    assert "| case | policy |" in (tmp_path / "outliers.md").read_text()

"""The churn benchmark keeps working: ``benchmarks/churn.py --quick`` with tiny sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_churn_quick_runs_and_writes_results(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "churn.py"), "--quick",
           "--sizes", "3", "--duration", "2", "--scrape-pods", "20", "--scrape-window", "1",
           "--scrape-warmup", "1", "--flips", "4", "--quiet", "0.5", "--batches", "5",
           "--farm-port", "0", "--output-dir", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "churn.json").read_text())
    assert {"meta", "churn", "micro", "scrape", "rss", "targets"} <= results.keys()
    assert set(results["churn"]) == {"rolling", "crash", "scale", "api_trouble",
                                     "rolling_prestop", "api_trouble_prestop"}
    for modes in results["churn"].values():
        assert set(modes) == {"service", "pod"}
        for run_result in modes.values():
            assert {"sent", "failed", "failed_by_cause", "reflect_ms",
                    "api_requests"} <= run_result.keys()
    micro = results["micro"]["3"]
    assert {"sync_s", "all_routable_s", "rss_after_sync_mb", "read_ns", "flip_ms",
            "steady"} <= micro.keys()
    assert {"concurrent", "sequential"} <= results["scrape"].keys()
    assert {"rss_imports_mb", "rss_after_sync_mb", "rss_after_scrape_mb",
            "pods_scraped"} <= results["rss"].keys(), results["rss"]
    assert all({"target", "goal", "measured", "met"} <= row.keys()
               for row in results["targets"])
    markdown = (tmp_path / "churn.md").read_text()
    assert "| target | goal | measured | met |" in markdown


def test_scale_step_runs_and_writes_results(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "churn.py"), "--only-scale",
           "--scale-sizes", "2", "4", "--scale-replicas", "3", "--flips", "4", "--batches", "5",
           "--scale-timeout", "60", "--steady-seconds", "2.5", "--rss-sample-interval", "1",
           "--steady-flip-every", "0.5", "--steady-down-for", "0.5", "--tracemalloc",
           "--farm-port", "0", "--output-dir", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "churn.json").read_text())
    assert set(results["scale"]) == {"2", "4"}
    for size in results["scale"].values():
        assert {"sync_s", "all_routable_s", "flip_down_ms", "flip_up_ms", "get_endpoint_info_ns",
                "rss_before_discovery_mb", "rss_all_routable_mb", "rss_end_mb",
                "bytes_per_pod_endpoint", "rss_growth_routable_to_end_mb",
                "steady"} <= size.keys(), size
        flips = min(4, size["services"])  # each flip takes a different Service
        assert size["flip_down_ms"]["count"] == size["flip_up_ms"]["count"] == flips, size
        steady = size["steady"]
        assert {"rss_samples_mb", "v1_models_per_s_total", "v1_models_per_s_per_engine",
                "requests_per_s_by_path", "rss_growth_minute1_to_end_mb",
                "tracemalloc_alive_end_library"} <= steady.keys(), steady
        assert size["all_routable_at_end"], size
    assert any(row["target"].startswith("scale:") for row in results["targets"])
    assert "## Scale" in (tmp_path / "churn.md").read_text()


def test_balance_runs_and_writes_results(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "balance.py"), "--window", "0.5",
           "--warmup", "0.2", "--pre-stop", "0.2", "--grace", "0.1", "--replicas", "2",
           "--scale-to", "3", "--output-dir", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "balance.json").read_text())
    assert set(results["arms"]) == {"service", "pod"}
    for arm in results["arms"].values():
        for phase in ("before", "after_rollout", "after_scale_up"):
            assert {"ready_pods", "requests", "share_pct", "idle_pods"} <= arm[phase].keys()
        assert arm["after_scale_up"]["ready_pods"] == 3
    assert "| phase | routing |" in (tmp_path / "balance.md").read_text()


def test_scrape_cpu_runs_and_writes_results(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "scrape_cpu.py"), "--pods", "3",
           "--rounds", "1", "--per-round", "20", "--profile-scrapes", "20",
           "--output-dir", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "scrape_cpu.json").read_text())
    for path in ("previous", "current"):
        figures = results["result"][path]
        assert {"fetch_us", "parse_us", "total_us", "scrapes_per_cpu_s"} <= figures.keys()
    assert results["profile"]["areas"] and results["profile"]["functions"]
    assert "| path | fetch µs |" in (tmp_path / "scrape_cpu.md").read_text()


def test_probe_cpu_runs_and_writes_results(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "probe_cpu.py"), "--pods", "12",
           "--rounds", "2", "--farm-port", "0", "--output-dir", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "probe_cpu.json").read_text())
    assert {"meta", "command", "pods", "rounds", "result"} <= results.keys()
    paths = [key for key in results["result"] if key != "cpu_ratio"]
    assert len(paths) == 2 and "cpu_ratio" in results["result"]
    for path in paths:
        assert results["result"][path]["failures"] == 0, results["result"]
    assert "| path | CPU µs per probe |" in (tmp_path / "probe_cpu.md").read_text()

"""The 60-second soak (``python benchmarks/soak.py --duration 60``) stays flat.

It runs in its own process so that threads and descriptors left behind by earlier tests cannot
blur the counts.  The bounds are the benchmark's own (see ``benchmarks/soak.py``): RSS growth
after warm-up < 5 %, the library's thread count identical after warm-up, all threads within
``THREAD_TOLERANCE``, open descriptors beyond one per pooled engine host within ``FD_TOLERANCE``
and no more pooled hosts than pods tracked (``POOL_SLACK``), the endpoint set exact at the
end, nothing escaped ``get_*()``, no crash logged, ``close()`` prompt.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.soak import FD_TOLERANCE, POOL_SLACK, RSS_GROWTH_BOUND, THREAD_TOLERANCE

ROOT = Path(__file__).resolve().parents[2]


def test_sixty_second_soak_ends_flat_and_exact(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--duration", "60",
           "--farm-port", "0", "--output-dir", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert (tmp_path / "soak.json").exists(), run.stderr[-3000:]
    results = json.loads((tmp_path / "soak.json").read_text())
    table = (tmp_path / "soak.md").read_text()
    assert "| bound | limit | measured | met |" in table
    failed = [row for row in results["bounds"] if not row["met"]]
    assert not failed, f"{failed}\n{table}"
    assert run.returncode == 0, run.stderr[-3000:]

    warm = [s for s in results["samples"] if s["t"] >= results["meta"]["warmup_s"]]
    assert len(warm) >= 10, table
    rss = [s["rss_mb"] for s in warm]
    assert (sorted(rss[-3:])[1] - sorted(rss[:3])[1]) / sorted(rss[:3])[1] < RSS_GROWTH_BOUND, table
    assert len({s["svcdisc_threads"] for s in warm}) == 1, table
    threads = [s["threads"] for s in warm]
    assert max(threads) - min(threads) <= THREAD_TOLERANCE, table
    unpooled = [s["fds"] - s["pooled_hosts"] for s in warm]
    assert max(unpooled) - min(unpooled) <= FD_TOLERANCE, table
    assert max(s["pool_excess"] for s in warm) <= POOL_SLACK, table
    # Caches follow the cluster, they do not pile up: nothing outlives its Service or pod.
    last = warm[-1]
    # the prober checks each ready pod and each Service name: no more than those (the
    # scraper's pod set, read in the same sample, may lag discovery by one 100 ms step)
    assert last["prober_targets"] <= last["services"] + last["scraper_pods"] + 10, table
    assert last["services"] <= 100, table
    assert last["scraper_readings"] <= last["scraper_pods"], table
    assert results["end"]["converged"], results["end"]["mismatch"]
    assert results["read_errors"] == 0 and not results["end"]["crash_logs"]
    assert not results["driver_errors"], results["driver_errors"]
    assert sum(results["faults"].values()) >= 20 and sum(results["churn"].values()) >= 200, table

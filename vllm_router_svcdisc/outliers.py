"""Internal: the outlier policy: which pods leave the routable pod set, and for how long.
Pure functions of :class:`~vllm_router_svcdisc.poller.PodHealth` records, a config and a time,
so every rule is unit-tested on hand-made records (no clock, no I/O).

Rules (defaults in :class:`OutlierConfig`; docs/architecture.md says why):

- **cannot connect** (refused, reset, connect timeout: nothing listens, or the node is gone):
  ejected at the first such failure.  A wrong verdict costs one re-check (``base_ejection_time``)
  and is bounded by the cap; a right one keeps a dead node's pods from hanging requests for the
  ~50 s Kubernetes needs.
- **slow** (connected, no answer within the timeout): never ejected for slowness alone — its
  stats are marked stale — unless it has not answered anything at all for ``dead_after``
  (120 s: longer than the 60-77 s prefills seen blocking an engine's event loop, and long after
  a readiness probe of the engine would have taken it out if it were really hung).
- **failing** (``consecutive_5xx`` answers of 5xx in a row, Envoy's default 5): ejected.
- **wedged** (requests running, ``vllm:prompt_tokens_total + vllm:generation_tokens_total``
  not moving for ``wedged_after``, 60 s): ejected with reason ``wedged``; it returns when the
  counters move again or nothing runs.
- **the cap**: at most ``max_ejection_percent`` of a Service's ready pods are out at once, and
  never its last one; pods beyond the cap stay listed ("failing open", as Envoy's panic mode
  and llm-d's endpoint picker do), which the Service's status, health reasons and metrics say.
- **re-admission**: an ejected pod is re-checked ``base_ejection_time x times ejected`` (at most
  ``max_ejection_time``) after its ejection, and returns as soon as the verdict clears; the
  count of ejections decays after ``max_ejection_time`` in service.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from .poller import CONNECT_FAILURES, Failure, PodHealth


@dataclass(frozen=True)
class OutlierConfig:
    """Outlier detection of :class:`~vllm_router_svcdisc.discovery.K8sServiceDiscovery`."""

    enabled: bool = True
    liveness_interval: float = 1.0   # each ready pod is checked this often (at least)
    connect_timeout: float = 0.5     # of a liveness check (a dead node answers no SYN)
    read_timeout: float = 0.5        # of a liveness check, once connected (slow != dead)
    connect_failures: int = 1        # consecutive refused / connect timeouts → ejected
    consecutive_5xx: int = 5         # consecutive 5xx (checks, scrapes, router outcomes)
    dead_after: float = 120.0        # connected but no answer at all for this long → ejected
    wedged_after: float = 60.0       # requests running, token counters frozen this long
    progress_interval: float = 10.0  # a liveness check reads /metrics (not /health) this often
    max_ejection_percent: float = 50.0
    base_ejection_time: float = 1.0  # first re-check of an ejected pod; x times ejected
    max_ejection_time: float = 30.0
    blip_window: float = 30.0        # a pod not ready for less keeps its state when it returns
    cpu_budget: float = 0.25         # CPU-seconds per second liveness checks may use
    workers: int = 16

    def __post_init__(self) -> None:
        if min(self.liveness_interval, self.connect_timeout, self.read_timeout,
               self.wedged_after, self.progress_interval, self.cpu_budget) <= 0:
            raise ValueError("OutlierConfig intervals, timeouts and budget must be > 0")
        if self.connect_failures < 1 or self.consecutive_5xx < 1 or self.workers < 1:
            raise ValueError("OutlierConfig failure thresholds and workers must be >= 1")
        if not 0 <= self.max_ejection_percent <= 100:
            raise ValueError("max_ejection_percent must be within 0..100")


class Reason(enum.StrEnum):
    """Why a pod is ejected (the label of ``vllm_svcdisc_outlier_ejections_total``)."""

    REFUSED = "refused"
    CONNECT_TIMEOUT = "connect_timeout"
    HTTP_5XX = "http_5xx"
    NO_ANSWER = "no_answer"
    WEDGED = "wedged"


@dataclass(frozen=True)
class Verdict:
    """A pod the policy would eject: ``reason`` (a :class:`Reason`) and words for people."""

    reason: Reason
    detail: str

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}"


def verdict(record: PodHealth, config: OutlierConfig, now: float) -> Verdict | None:
    """Whether ``record``'s pod should be out of the routable set now (None: it may serve)."""
    if not config.enabled:
        return None
    connect = record.consecutive(CONNECT_FAILURES)
    # a read timeout after the connect failure proves nothing (a connection opened before the
    # node died times out too); only an answer or an accepted connection clears it
    reached = (record.reachable_at is not None and record.last_connect_failure is not None
               and record.reachable_at >= record.last_connect_failure)
    if connect >= config.connect_failures and not reached:
        reason = (Reason.REFUSED if record.connect_failure is Failure.REFUSED
                  else Reason.CONNECT_TIMEOUT)
        return Verdict(reason, f"cannot connect ({record.connect_reason or reason.value})")
    errors = record.failures.get(Failure.HTTP_5XX, 0)
    if errors >= config.consecutive_5xx:
        return Verdict(Reason.HTTP_5XX, f"{errors} consecutive 5xx answers")
    if (record.failing_since is not None and record.failures.get(Failure.READ_TIMEOUT)
            and now - record.failing_since >= config.dead_after):
        return Verdict(Reason.NO_ANSWER, f"no answer for {now - record.failing_since:.0f}s "
                                         "(connections are accepted)")
    if record.stuck_since is not None and now - record.stuck_since >= config.wedged_after:
        return Verdict(Reason.WEDGED, f"{record.running:.0f} requests running, no token "
                                      f"progress for {now - record.stuck_since:.0f}s")
    return None


def recheck_delay(times_ejected: int, config: OutlierConfig) -> float:
    """When an ejected pod is checked again: base x times ejected, capped."""
    return min(config.max_ejection_time, config.base_ejection_time * max(1, times_ejected))


def decayed_times(record: PodHealth, config: OutlierConfig, now: float) -> int:
    """Times ejected, forgotten once the pod has served ``max_ejection_time`` since its return."""
    if (record.ejected_reason is None and record.admitted_at is not None
            and now - record.admitted_at >= config.max_ejection_time):
        return 0
    return record.times_ejected


def max_ejections(ready: int, percent: float) -> int:
    """How many of ``ready`` pods may be out at once: ``percent`` of them rounded down, at
    least one — but never the last one (ejecting it would leave nothing to route to)."""
    if ready <= 1:
        return 0
    return min(ready - 1, max(1, math.floor(ready * percent / 100.0 + 1e-9)))


def select(ready: Sequence[str], candidates: Mapping[str, str], ejected_before: Collection[str],
           percent: float) -> tuple[dict[str, str], dict[str, str]]:
    """Apply the cap to one Service: (ejected, held) pod URL → reason, from its ready pods'
    verdicts.  Pods already out stay out first (no flapping between pods), then in ``ready``
    order; the rest are held in (fail open)."""
    wanted = [url for url in ready if url in candidates]
    if not wanted:
        return {}, {}
    allowed = max_ejections(len(ready), percent)
    order = sorted(wanted, key=lambda url: url not in ejected_before)  # stable
    ejected = {url: candidates[url] for url in order[:allowed]}
    held = {url: candidates[url] for url in order[allowed:]}
    return ejected, held


def liveness_interval(pods: int, cost_per_check: float, config: OutlierConfig) -> float:
    """The liveness interval: the configured one, stretched so ``pods`` checks per interval
    cost at most ``cpu_budget`` CPU-seconds per second."""
    return max(config.liveness_interval, pods * max(0.0, cost_per_check) / config.cpu_budget)

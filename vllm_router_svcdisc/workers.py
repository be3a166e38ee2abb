"""A bounded worker pool whose ``close()`` waits for its threads, by a deadline.

``ThreadPoolExecutor.shutdown`` either returns at once (``wait=False``, threads still running)
or waits without a bound.  The prober and the scraper promise that every thread they started
has ended when they are closed; with their in-flight requests aborted first, the workers end
in milliseconds, and the deadline bounds what cannot be interrupted (a TCP connect).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor


class WorkerPool(ThreadPoolExecutor):
    """A ThreadPoolExecutor that knows its threads (recorded as each one starts)."""

    def __init__(self, workers: int, name: str) -> None:
        self._started: list[threading.Thread] = []
        self._started_lock = threading.Lock()
        super().__init__(workers, thread_name_prefix=name, initializer=self._record_thread)

    def _record_thread(self) -> None:
        with self._started_lock:
            self._started.append(threading.current_thread())

    def close(self, deadline: float) -> bool:
        """Drop queued work, let running work end, join the threads until ``deadline``.

        Returns True when every thread has ended.
        """
        self.shutdown(wait=False, cancel_futures=True)
        with self._started_lock:
            threads = list(self._started)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads if t is not threading.current_thread())

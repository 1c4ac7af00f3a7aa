"""The reconciler's loop: a thread in every control worker; one pass at a time across all of them
(a Redis lock), every `SPIDER_RECONCILE_INTERVAL_S` seconds, re-examines the jobs that have not
moved for `SPIDER_RECONCILE_AFTER_S` (spider.jobs.recovery). Now and then the pass also sweeps the
folders of jobs Redis no longer knows."""

from __future__ import annotations

import logging
import threading
import time

from spider.jobs import recovery
from spider.jobs.stages import Context

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(self, ctx: Context):
        self.ctx = ctx
        settings = ctx.settings
        self.interval = settings.reconcile_interval_s
        self.still_for = settings.reconcile_after_s
        self.sweep_every = settings.sweep_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spider-reconciler", daemon=True)
        self._last_sweep = 0.0

    def start(self) -> "Reconciler":
        if self.interval > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except Exception:  # Redis down, say: the next pass tries again
                log.warning("reconciler pass failed", exc_info=True)

    def run_once(self) -> bool:
        """One pass, unless another control worker's pass holds the lock. True when this one ran."""
        store = self.ctx.store
        lock = store.keys.reconciler_lock()
        if not store.r.set(lock, "1", nx=True, ex=max(1, int(self.interval))):
            return False
        handed = recovery.reconcile(self.ctx, self.still_for)
        if handed:
            log.warning("reconciler handed out lost work of %d jobs: %s", len(handed), handed)
        if self.sweep_every > 0 and time.monotonic() - self._last_sweep > self.sweep_every:
            self._last_sweep = time.monotonic()
            swept = recovery.sweep_files(self.ctx, grace_s=self.ctx.settings.sweep_grace_s)
            if swept["removed"] or swept["restored"]:
                log.warning("sweep of job folders: %s", swept)
        return True

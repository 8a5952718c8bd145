"""System metrics (CPU, memory, disk, network, GPU) of a run, sampled through its logger.

MLflow's own monitor gives up at the first failed call; here only its collectors are used,
and the samples go through a ``RunLogger``, so an outage of the server queues them too.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from vitok.platform.tracking import tracking_spool


class RunLogger(Protocol):
    """What the sampler uses of its logger (``run_logger.RunLogger``, which imports this
    module to start one)."""

    run_id: str
    uri: str
    request_timeout_s: float
    client: Any

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...


def start_system_sampler(logger: RunLogger, interval_s: float = 5.0) -> SystemSampler | None:
    """Sample every ``interval_s`` into ``system/`` metrics of ``logger``'s run. Returns the
    sampler (call ``.finish()``) or None when MLflow's collectors are unavailable."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        collectors = SystemMetricsMonitor(
            logger.run_id,
            sampling_interval=interval_s,
            resume_logging=False,
            tracking_uri=logger.uri,
        ).monitors
    except Exception as err:  # psutil missing or an MLflow change: not worth a crash
        print(f"[vitok] system metrics off: {err}")
        return None
    sampler = SystemSampler(logger, collectors, interval_s)
    sampler.start()
    return sampler


class SystemSampler:
    """MLflow's system-metric collectors, sampled on a thread, logged through a RunLogger."""

    def __init__(self, logger: RunLogger, collectors: list[Any], interval_s: float) -> None:
        self.logger, self.collectors, self.interval_s = logger, collectors, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vitok-system-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def finish(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)

    def _first_step(self) -> int:
        """After the last ``system/`` step a resumed run logged (0 when unknown)."""
        try:
            with tracking_spool.fail_fast(self.logger.request_timeout_s):
                run = self.logger.client.get_run(self.logger.run_id)
        except Exception:  # noqa: BLE001 - server away: start at 0
            return 0
        latest = getattr(run.data, "_metric_objs", [])  # the last point of each metric
        steps = [m.step for m in latest if m.key.startswith("system/")]
        return max(steps) + 1 if steps else 0

    def _run(self) -> None:
        step = self._first_step()
        while not self._stop.wait(self.interval_s):
            metrics: dict[str, float] = {}
            try:
                for collector in self.collectors:
                    collector.collect_metrics()
                for collector in self.collectors:
                    metrics.update(collector.aggregate_metrics())
                    collector.clear_metrics()
            except Exception as err:  # noqa: BLE001 - a collector failing is not worth a crash
                print(f"[vitok] system metrics stopped: {err}")
                return
            self.logger.log_metrics({f"system/{k}": v for k, v in metrics.items()}, step=step)
            step += 1

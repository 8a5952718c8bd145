"""A study's state under the storage root, and the Tune callbacks of its trials and driver
(the Tune run itself is built in ``pipelines/study_tune.py``).

A study folder (``<root>/studies/<name>``) holds everything a stopped study needs to go on,
whatever node or code runs it next::

    config.yaml                 the resolved config of the study
    mlflow_run_id               the parent MLflow run
    trials/<trial>/result.json  a trial's committed result (written once, when it ends)
    trials/<trial>/...          its MLflow run ids, Ray Train storage, latents
    events/*.json               one object per trial start / finish (append-only evidence)
    tune/                       Ray Tune's experiment state (never needed for resume)
    report/                     plots, tables, fits

Resume never depends on Tune's own state: a trial whose ``result.json`` exists is finished;
a new Tune run gets only the trials that are not (grid), or the remaining samples with the
finished ones told to the searcher first (Optuna). A trial that finds its own committed
result reports it and returns at once, so a trial Tune reruns anyway costs nothing.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vitok.platform import storage
from vitok.platform.study.leases import holder_alive

STUDIES = "studies"
LEASE_FILE = "driver.json"
LEASE_HEARTBEAT_S = 20.0
LEASE_STALE_S = 90.0
RESULT_FILE = "result.json"
FINISHED, STOPPED = "finished", "stopped"
# In a trial's result: it found its committed result (the same configuration ran before,
# in this study or an earlier run of it) and reported that, without running again.
REUSED = "reused_committed_result"


class StudyStore:
    """One study folder (a local path or a URI under the storage root)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def __getstate__(self) -> dict[str, Any]:
        """Only the location travels (to trials, Tune callbacks): the lease stays here."""
        return {"uri": self.uri}

    @property
    def name(self) -> str:
        return storage.name(self.uri)

    @classmethod
    def locate(cls, root: str, name: str, *, resume: bool) -> StudyStore:
        """``<root>/studies/<name>``: with ``resume`` the latest study of that name (an error
        if there is none); else a fresh folder (``name``, ``name-2``, ...), never an old one."""
        parent = storage.join(root, STUDIES)
        taken = set(storage.listdir(parent))
        candidates = [name] + [f"{name}-{i}" for i in range(2, 1000)]
        if resume:
            existing = [c for c in candidates if c in taken]
            if not existing:
                raise SystemExit(
                    f"error: --resume but no study {name!r} under {parent} "
                    f"(studies there: {sorted(taken) or 'none'})"
                )
            return cls(storage.join(parent, existing[-1]))
        return cls(storage.join(parent, next(c for c in candidates if c not in taken)))

    def path(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    # -- one driver at a time -------------------------------------------------------------
    def acquire(self, settle_s: float = 1.0) -> None:
        """Become the study's only driver, or exit naming the one that runs it.

        A lease (``driver.json``: host, pid, heartbeat) is written, then read back after
        ``settle_s``: of two drivers starting together, the later write wins and the other
        is refused. A lease whose driver is gone (a dead pid on this host, or no heartbeat
        for ``LEASE_STALE_S``) is taken over, so a killed study resumes at once.
        """
        holder = self._lease()
        if holder is not None and holder_alive(holder, LEASE_STALE_S):
            raise SystemExit(
                f"error: study {self.name} is being run by pid {holder['pid']} on "
                f"{holder['host']} (since {time.ctime(holder['started'])}); stop that one first "
                "(its --resume then continues), or start a study of another name"
            )
        token = uuid.uuid4().hex
        now = time.time()
        lease = {"token": token, "host": socket.gethostname(), "pid": os.getpid()}
        self._write_lease({**lease, "started": now, "heartbeat": now})
        time.sleep(settle_s)
        if (self._lease() or {}).get("token") != token:
            raise SystemExit(
                f"error: another driver claimed study {self.name} at the same moment; "
                "start again with a new name, or --resume once it has stopped"
            )
        self._token = token
        self._stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(lease, now), daemon=True)
        beat.start()

    def release(self) -> None:
        """Give up the lease (only our own)."""
        token = getattr(self, "_token", None)
        if token is None:
            return
        self._stop.set()
        if (self._lease() or {}).get("token") == token:
            storage.delete(self.path(LEASE_FILE))
        self._token = None

    def _lease(self) -> dict[str, Any] | None:
        uri = self.path(LEASE_FILE)
        return storage.read_json(uri) if storage.is_file(uri) else None

    def _write_lease(self, lease: dict[str, Any]) -> None:
        storage.write_json(self.path(LEASE_FILE), lease)

    def _heartbeat(self, lease: dict[str, Any], started: float) -> None:
        while not self._stop.wait(LEASE_HEARTBEAT_S):
            try:
                if (self._lease() or {}).get("token") != lease["token"]:
                    return  # taken over: never overwrite another driver's lease
                self._write_lease({**lease, "started": started, "heartbeat": time.time()})
            except OSError as err:  # storage hiccup: the next beat tries again
                print(f"[vitok] study lease heartbeat failed: {err}", flush=True)

    def trial_dir(self, trial: str) -> str:
        return self.path("trials", trial)

    # -- committed results ------------------------------------------------------------
    def result(self, trial: str) -> dict[str, Any] | None:
        uri = storage.join(self.trial_dir(trial), RESULT_FILE)
        return storage.read_json(uri) if storage.is_file(uri) else None

    def commit(self, trial: str, result: Mapping[str, Any], status: str = FINISHED) -> None:
        """Record a trial's final result (one atomic write): from now on it is done."""
        record = {**result, "trial": trial, "status": status, "committed_at": time.time()}
        storage.write_json(storage.join(self.trial_dir(trial), RESULT_FILE), record)

    def results(self) -> dict[str, dict[str, Any]]:
        """Every committed trial result, by trial name."""
        out = {}
        for trial in storage.listdir(self.path("trials")):
            result = self.result(trial)
            if result is not None:
                out[trial] = result
        return out

    # -- events -----------------------------------------------------------------------
    def log_event(self, trial: str, event: str, **info: Any) -> None:
        """One object per event (object stores cannot append): evidence of what ran."""
        stamp = time.time_ns()
        record = {"trial": trial, "event": event, "time": stamp / 1e9, **info}
        storage.write_json(self.path("events", f"{stamp}-{trial}-{event}.json"), record)

    def events(self) -> list[dict[str, Any]]:
        names = [n for n in storage.listdir(self.path("events")) if n.endswith(".json")]
        return [storage.read_json(self.path("events", n)) for n in sorted(names)]


def report_to_tune_callback(required: Sequence[str], constants: Mapping[str, Any]) -> Any:
    """A Ray Train callback that forwards a Train report to the Tune trial only when it
    carries every ``required`` metric (after adding ``constants``, e.g. the trial's FLOPs).

    Searchers and schedulers read their metric from every result they see: Optuna raises on
    a result without it, and ASHA must compare like with like. Training-only reports (loss,
    throughput) therefore stay in MLflow; evaluation reports reach Tune.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class _ReportObjectives(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
            merged = [{**constants, **m} for m in metrics]
            if merged and all(key in merged[0] for key in required):
                super().after_report(run_context, merged, checkpoint)

    return _ReportObjectives()


class StatusTable:
    """The study's live status: one row per trial (state, its last objective values, minutes).

    On a terminal it is redrawn in place (at most every ``interval_s``); lines printed
    through ``line`` appear above it. Elsewhere (a log file, CI) only the lines are printed.
    """

    def __init__(self, columns: Sequence[str], interval_s: float = 2.0, stream: Any = None):
        self.columns = list(columns)
        self.rows: dict[str, dict[str, Any]] = {}
        self._stream = stream  # None: sys.stdout when drawing (Tune pickles its callbacks)
        self.interval_s = interval_s
        self.drawn = 0  # lines of the table now on screen
        self.last_draw = 0.0

    @property
    def stream(self) -> Any:
        import sys

        return self._stream or sys.stdout

    @property
    def live(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, name: str, **values: Any) -> None:
        row = self.rows.setdefault(name, {"state": "pending", "since": time.time()})
        if values.get("state") == "running" and row["state"] != "running":
            row["since"] = time.time()
        row.update(values)

    def line(self, text: str) -> None:
        self._clear()
        print(text, file=self.stream, flush=True)
        self.draw(force=True)

    def draw(self, force: bool = False) -> None:
        if not self.live or not self.rows:
            return
        if not force and time.monotonic() - self.last_draw < self.interval_s:
            return
        self._clear()
        text = self.render()
        print(text, file=self.stream, flush=True)
        self.drawn = text.count("\n") + 1
        self.last_draw = time.monotonic()

    def render(self) -> str:
        counts: dict[str, int] = {}
        for row in self.rows.values():
            counts[row["state"]] = counts.get(row["state"], 0) + 1
        head = ["trial", "state", *self.columns, "min"]
        body = []
        for name, row in self.rows.items():
            minutes = (row.get("end", time.time()) - row["since"]) / 60
            cells = [_cell(row.get(c)) for c in self.columns]
            body.append([name, row["state"], *cells, f"{minutes:.1f}"])
        widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
        lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)) for r in [head, *body]]
        summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        return "\n".join([f"[vitok] trials: {summary}", *lines])

    def _clear(self) -> None:
        if self.live and self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")  # up to the table's top, erase
            self.drawn = 0


def _last_line(error_file: str | None) -> str:
    """The exception line of a Tune error file, and where the whole traceback is."""
    try:
        lines = [x for x in storage.read_text(error_file).splitlines() if x.strip()]
    except Exception:
        return str(error_file)
    return f"{lines[-1] if lines else '?'} (traceback: {error_file})"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def study_progress(
    store: StudyStore,
    trial_name: Callable[[dict], str],
    summary: Callable[[dict], str],
    columns: Sequence[str] = (),
) -> Any:
    """A Tune callback on the study driver: a status table of the trials (``columns`` of
    their last results; redrawn in place on a terminal), one line per trial that ends
    (``summary`` of its result), and a trial the scheduler stopped early (ASHA) committed as
    ``stopped`` with its last result, so a resumed study does not rerun it."""
    from ray.tune import Callback

    table = StatusTable(columns)

    class _StudyProgress(Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any):
            for other in trials:  # the searcher's queue, as pending rows
                table.update(trial_name(other.config))
            table.update(trial_name(trial.config), state="running")
            table.draw(force=True)

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
            table.update(trial_name(trial.config), **{c: result.get(c) for c in columns})
            table.draw()

        def on_step_end(self, iteration: int, trials: list, **info: Any):
            table.draw()

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any):
            name = trial_name(trial.config)
            last = {
                k: v
                for k, v in (trial.last_result or {}).items()
                if isinstance(v, int | float | str) and not k.startswith("time_")
            }
            status = FINISHED
            if store.result(name) is None and last:
                store.commit(name, {**last, "params": dict(trial.config)}, status=STOPPED)
                status = STOPPED
            minutes = float((trial.last_result or {}).get("time_total_s", 0.0)) / 60
            if last.get(REUSED):
                status = "reused"
                text = (
                    f"[vitok] trial {name} reused: this configuration already ran; its "
                    f"committed result was reported again, nothing trained ({summary(last)})"
                )
            else:
                text = f"[vitok] trial {name} {status}: {summary(last)}, {minutes:.1f} min"
            table.update(name, state=status, end=time.time(), **{c: last.get(c) for c in columns})
            table.line(text)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any):
            name = trial_name(trial.config)
            table.update(name, state="error", end=time.time())
            table.line(f"[vitok] trial {name} failed: {_last_line(trial.error_file)}")

    return _StudyProgress()


def seeded_optuna_storage(
    path: str,
    study_name: str,
    space: Mapping[str, Sequence[str]],
    directions: Sequence[str],
    done: Sequence[tuple[Mapping[str, str], Sequence[float]]],
) -> str:
    """A fresh Optuna study in a local sqlite file holding the ``done`` trials (params,
    objective values) as completed, so TPE starts where the stopped study was."""
    import optuna

    url = f"sqlite:///{path}"
    study = optuna.create_study(
        storage=url,
        study_name=study_name,
        directions=["maximize" if d == "max" else "minimize" for d in directions],
    )
    distributions = {
        k: optuna.distributions.CategoricalDistribution(list(v)) for k, v in space.items()
    }
    for params, values in done:
        study.add_trial(
            optuna.trial.create_trial(
                params={k: params[k] for k in space},
                distributions=distributions,
                values=[float(v) for v in values],
            )
        )
    return url


__all__ = [
    "FINISHED",
    "REUSED",
    "STOPPED",
    "StatusTable",
    "StudyStore",
    "study_progress",
    "report_to_tune_callback",
    "seeded_optuna_storage",
]

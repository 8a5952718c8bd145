"""The study folder: committed results, events, and one driver per study (the lease)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vitok.platform import storage
from vitok.platform.study.store import LEASE_FILE, StudyStore


def test_locate_fresh_and_resume(tmp_path: Path):
    root = str(tmp_path)
    first = StudyStore.locate(root, "demo", resume=False)
    assert first.uri == str(tmp_path / "studies" / "demo")
    with pytest.raises(SystemExit, match="--resume but no study 'demo'"):
        StudyStore.locate(root, "demo", resume=True)
    first.commit("c2", {"val/psnr": 20.0})
    assert StudyStore.locate(root, "demo", resume=True).uri == first.uri
    assert StudyStore.locate(root, "demo", resume=False).name == "demo-2"  # never reused
    assert first.results()["c2"]["status"] == "finished"
    first.log_event("c2", "started", node_id="n1")
    first.log_event("c2", "finished")
    assert [e["event"] for e in first.events()] == ["started", "finished"]


def test_a_study_has_one_driver(tmp_path: Path):
    store = StudyStore(str(tmp_path / "studies" / "s"))
    store.acquire(settle_s=0.0)
    with pytest.raises(SystemExit, match=r"is being run by pid \d+"):
        StudyStore(store.uri).acquire(settle_s=0.0)
    store.release()
    assert not storage.exists(store.path(LEASE_FILE))
    again = StudyStore(store.uri)
    again.acquire(settle_s=0.0)
    again.release()


def test_a_dead_drivers_lease_is_taken_over(tmp_path: Path):
    """A SIGKILLed driver leaves its lease behind; --resume on this host takes it at once."""
    store = StudyStore(str(tmp_path / "studies" / "s"))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    import socket

    storage.write_json(
        store.path(LEASE_FILE),
        {
            "token": "x",
            "host": socket.gethostname(),
            "pid": int(dead.stdout),
            "started": 0,
            "heartbeat": 0,
        },
    )
    store.acquire(settle_s=0.0)
    assert storage.read_json(store.path(LEASE_FILE))["token"] != "x"
    store.release()


def test_two_drivers_starting_together_one_wins(tmp_path: Path):
    uri = str(tmp_path / "studies" / "s")
    code = textwrap.dedent(
        f"""
        import time
        from vitok.platform.study.store import StudyStore
        s = StudyStore({uri!r})
        s.acquire(settle_s=2.0)
        print("WON", flush=True)
        time.sleep(4)
        s.release()
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    won = [out for out, _ in outs if "WON" in out]
    refused = [err for _, err in outs if "error: " in err]
    assert len(won) == 1 and len(refused) == 1, outs


def test_a_held_store_pickles_as_its_location(tmp_path: Path):
    import pickle

    store = StudyStore(str(tmp_path / "studies" / "s"))
    store.acquire(settle_s=0.0)
    copy = pickle.loads(pickle.dumps(store))  # Tune pickles its callbacks and trainables
    assert copy.uri == store.uri and copy.release() is None  # a copy holds no lease
    assert storage.exists(store.path(LEASE_FILE))
    store.release()


def test_status_table_redraws_in_place_on_a_terminal_and_prints_only_lines_elsewhere():
    import io

    from vitok.platform.study.store import StatusTable

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    table = StatusTable(["E", "val/psnr"], interval_s=0.0, stream=term)
    table.update("c4")
    table.update("c8", state="running")
    table.draw()
    first = term.getvalue()
    assert "[vitok] trials: 1 pending, 1 running" in first and "\x1b[" not in first
    table.update("c8", state="finished", E=1024, **{"val/psnr": 21.234567})
    table.line("[vitok] trial c8 finished: E=1024, PSNR 21.2 dB")
    second = term.getvalue()[len(first) :]
    # Up over the old table's 4 lines and erase, the line, then the new table below it.
    assert second.startswith("\x1b[4F\x1b[J[vitok] trial c8 finished")
    assert "21.23" in second and "1 finished, 1 pending" in second

    log = io.StringIO()  # not a terminal: the lines only, no table, no escape codes
    table = StatusTable(["E"], interval_s=0.0, stream=log)
    table.update("c4", state="running")
    table.draw()
    table.line("[vitok] trial c4 finished: E=256")
    assert log.getvalue() == "[vitok] trial c4 finished: E=256\n"


def test_a_configuration_proposed_while_it_runs_waits_for_its_result(tmp_path: Path):
    """Two attempts (Tune trials) of one configuration: the first holds the trial and runs
    it; the second waits, and gets the first one's committed result instead of training the
    same folder again at the same time."""
    import threading
    import time

    from vitok.platform.study.leases import TrialLease

    trial = str(tmp_path / "trials" / "c8")
    result: dict = {}
    first = TrialLease(trial, "trial-a", settle_s=0.05)
    assert first.acquire_or_wait(lambda: result or None) is None  # first: runs it
    waited: list = []
    second = TrialLease(trial, "trial-b", settle_s=0.05)
    waiter = threading.Thread(
        target=lambda: waited.append(second.acquire_or_wait(lambda: result or None, 0.05))
    )
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and not waited  # the holder runs: the second waits
    result.update({"val/psnr": 20.0})  # the first commits, then releases
    first.release()
    waiter.join(5)
    assert waited == [{"val/psnr": 20.0}]
    assert not (Path(trial) / "lease.json").exists()


def test_a_dead_trials_lease_is_taken_over_and_a_retry_retakes_its_own(tmp_path: Path):
    import json
    import socket

    from vitok.platform.study.leases import TrialLease

    trial = tmp_path / "trials" / "c8"
    trial.mkdir(parents=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    lease = {"owner": "trial-a", "token": "t", "host": socket.gethostname(), "pid": int(dead)}
    (trial / "lease.json").write_text(json.dumps({**lease, "heartbeat": 0}))
    taker = TrialLease(str(trial), "trial-b", settle_s=0.05)
    assert taker.acquire_or_wait(lambda: None, 0.05) is None  # the holder's pid is gone
    assert json.loads((trial / "lease.json").read_text())["owner"] == "trial-b"
    # A retried attempt (the same Tune trial) takes its own live lease back at once.
    retry = TrialLease(str(trial), "trial-b", settle_s=0.05)
    assert retry.acquire_or_wait(lambda: None, 0.05) is None
    taker.release()  # not its lease any more: leaves the retry's in place
    assert json.loads((trial / "lease.json").read_text())["token"] == retry._token
    retry.release()
    assert not (trial / "lease.json").exists()

"""The study folder: committed results, events, and one driver per study (the lease)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vitok.platform import storage
from vitok.platform.study import LEASE_FILE, StudyStore


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
        from vitok.platform.study import StudyStore
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

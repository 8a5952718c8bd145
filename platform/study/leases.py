"""Leases under the storage root: who runs a study or a trial, and whether they still do.

A lease is a small JSON file (host, pid, a token, a heartbeat time) that its holder
rewrites every few seconds. It is alive while its pid runs (on this host) or, seen from
another host, while its heartbeat is recent. Object stores have no atomic create, so a
lease is taken by writing it and reading it back after a settle time: of two writers, the
later one wins and the other sees a token not its own.

A trial's lease keeps a configuration from training twice at once: a search (Optuna with
two trials at a time) may propose a configuration again while it still runs. The second
proposal waits for the first one's committed result and reuses it; if the first one dies,
its lease goes stale and the second takes the trial over.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from vitok.platform import storage

TRIAL_LEASE = "lease.json"
TRIAL_HEARTBEAT_S = 10.0
TRIAL_STALE_S = 45.0


def holder_alive(lease: Mapping[str, Any], stale_s: float) -> bool:
    """A lease's holder still runs: its pid on this host, else a heartbeat within
    ``stale_s``."""
    if lease.get("host") == socket.gethostname():
        try:
            os.kill(int(lease["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return time.time() - float(lease.get("heartbeat", 0)) < stale_s


class TrialLease:
    """Hold a trial (``<trial dir>/lease.json``) while it runs, or wait for its result.

    ``owner`` names the attempt (a Tune trial id): a retried trial (the same owner) takes
    its own lease back at once; another owner waits while the holder is alive.
    """

    def __init__(self, trial_dir: str, owner: str, *, settle_s: float = 0.5) -> None:
        self.uri = storage.join(trial_dir, TRIAL_LEASE)
        self.owner = owner
        self.settle_s = settle_s
        self._token: str | None = None
        self._stop = threading.Event()

    def acquire_or_wait(
        self, committed: Callable[[], dict[str, Any] | None], poll_s: float = 2.0
    ) -> dict[str, Any] | None:
        """None once this attempt holds the trial (the caller runs it, then ``release``);
        or the trial's committed result, as soon as one exists (the caller reuses it)."""
        while True:
            result = committed()
            if result is not None:
                return result
            holder = self._read()
            if (
                holder is None
                or holder.get("owner") == self.owner
                or not holder_alive(holder, TRIAL_STALE_S)
            ):
                if self._try_take():
                    result = committed()  # committed while we took it: nothing to run
                    if result is not None:
                        self.release()
                    return result
            time.sleep(poll_s)

    def release(self) -> None:
        """Give up the lease (only our own)."""
        self._stop.set()
        if self._token and (self._read() or {}).get("token") == self._token:
            storage.delete(self.uri)
        self._token = None

    def _try_take(self) -> bool:
        token = uuid.uuid4().hex
        lease = {"owner": self.owner, "token": token, "host": socket.gethostname()}
        lease["pid"] = os.getpid()
        storage.write_json(self.uri, {**lease, "heartbeat": time.time()})
        time.sleep(self.settle_s)
        if (self._read() or {}).get("token") != token:
            return False
        self._token = token
        self._stop.clear()
        threading.Thread(target=self._beat, args=(lease,), daemon=True).start()
        return True

    def _beat(self, lease: dict[str, Any]) -> None:
        while not self._stop.wait(TRIAL_HEARTBEAT_S):
            try:
                if (self._read() or {}).get("token") != lease["token"]:
                    return  # taken over: never overwrite another holder's lease
                storage.write_json(self.uri, {**lease, "heartbeat": time.time()})
            except OSError as err:  # a storage hiccup: the next beat tries again
                print(f"[vitok] trial lease heartbeat failed: {err}", flush=True)

    def _read(self) -> dict[str, Any] | None:
        try:
            return storage.read_json(self.uri) if storage.is_file(self.uri) else None
        except (OSError, ValueError):  # half-written by another holder: read it again
            return None

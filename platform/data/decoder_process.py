"""``decode_file`` in a child process that can be abandoned.

A file that hangs the decoder (inside FFmpeg, where no Python exception reaches) is cut off
after a timeout, and one that crashes it (a segfault, the OOM killer) is rejected, not fatal.
One long-lived child per calling process, reused across files; it runs exactly the caller's
code (same interpreter, ``sys.path`` and, in a Ray job, the same shipped copy of vitok).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from vitok.platform.data.clip_decode import Clip, ClipSpec, Rejected, decode_file

DECODER_IDLE_EXIT_S = 300.0  # a decoder child with no work for this long leaves
_IDLE_EXIT = 3  # its exit code then (the parent just starts another)
_CHILD = """
import json, os, sys
sys.path[:] = json.loads(os.environ.pop("VITOK_DECODER_SYS_PATH"))
from vitok.platform.runtime import use_shipped_code
use_shipped_code(os.environ.pop("VITOK_DECODER_ROOT", None) or None)
from vitok.platform.data.decoder_process import serve_decoder
serve_decoder(int(sys.argv[1]), int(sys.argv[2]))
"""


def serve_decoder(fd_in: int, fd_out: int) -> None:
    """The decoder child's loop: ``(path, spec, timeout_s, fault)`` in, one reply out:
    ``("ok", [(clip, start_s, fps, clip_index), ...])``, ``("rejected", reason)`` or
    ``("error", text)``. ``fault`` ("hang", "crash") stands in for a broken decoder in tests."""
    import faulthandler
    from multiprocessing.connection import Connection

    requests, replies = Connection(fd_in, writable=False), Connection(fd_out, readable=False)
    while True:
        if not requests.poll(DECODER_IDLE_EXIT_S):
            os._exit(_IDLE_EXIT)
        try:
            path, spec, timeout_s, fault = requests.recv()
        except (EOFError, OSError):  # the parent is gone
            os._exit(0)
        # Should the parent die while a decode hangs, the child still ends: faulthandler's
        # watchdog is a C thread that needs no GIL (it also prints where it hung).
        faulthandler.dump_traceback_later(timeout_s + 30.0, exit=True)
        try:
            _inject(fault)
            clips = decode_file(path, spec)
            reply = ("ok", [(c.clip, c.start_s, c.fps, c.clip_index) for c in clips])
        except Rejected as err:
            reply = ("rejected", str(err))
        except Exception as err:  # noqa: BLE001 - reported as the file's reject reason
            reply = ("error", f"{type(err).__name__}: {err}")
        faulthandler.cancel_dump_traceback_later()
        try:
            replies.send(reply)
        except OSError:
            os._exit(0)


def _inject(fault: str | None) -> None:
    if fault == "hang":  # native code holding the GIL: no Python signal handler runs
        import ctypes

        ctypes.PyDLL(None).sleep(10**6)
    elif fault == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {code}"


class IsolatedDecoder:
    """``decode_file`` in a long-lived child process (one per calling process, reused).

    A file with no result after ``timeout_s`` is rejected with a reason starting
    ``timeout``, a file during which the child dies with one starting ``crashed``; the child
    is replaced for the next file. The cost is a pipe round trip per file (clips are pickled
    back) and one interpreter start per calling process.
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._requests = self._replies = None
        self._lock = threading.Lock()

    def decode(
        self, path: str | Path, spec: ClipSpec, timeout_s: float, fault: str | None = None
    ) -> list[Clip]:
        with self._lock:
            for attempt in range(2):
                self._start()
                try:
                    self._requests.send((str(path), spec, timeout_s, fault))
                except OSError:  # it had left for lack of work: start another
                    self._stop()
                    continue
                if not self._replies.poll(timeout_s):
                    self._stop()
                    raise Rejected(
                        f"timeout: no result after {timeout_s:g} s (data.decode_timeout_s); "
                        "the decoder was stopped"
                    )
                try:
                    kind, payload = self._replies.recv()
                except (EOFError, OSError):
                    code = self._stop()
                    if code == _IDLE_EXIT and attempt == 0:
                        continue
                    raise Rejected(
                        f"crashed: the decoder process died ({_exit_reason(code)})"
                    ) from None
                if kind == "rejected":
                    raise Rejected(payload)
                if kind == "error":  # as an in-process decode reports it
                    raise Rejected(f"error: {payload}")
                return [Clip(clip=c, start_s=s, fps=f, clip_index=i) for c, s, f, i in payload]
        raise Rejected("crashed: the decoder process could not be started")

    def _start(self) -> None:
        from multiprocessing.connection import Connection

        if self._proc is not None and self._proc.poll() is None:
            return
        self._stop()
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        # The child runs exactly this process's code: same interpreter, sys.path and, in a
        # Ray job, the same shipped copy of vitok.
        roots = [str(f.vitok_root) for f in sys.meta_path if hasattr(f, "vitok_root")]
        env = {**os.environ, "VITOK_DECODER_SYS_PATH": json.dumps(sys.path)}
        env["VITOK_DECODER_ROOT"] = roots[0] if roots else ""
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(req_r), str(rep_w)],
                pass_fds=(req_r, rep_w),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            os.close(req_r)
            os.close(rep_w)
        self._requests = Connection(req_w, readable=False)
        self._replies = Connection(rep_r, writable=False)

    def _stop(self) -> int | None:
        """End the child (SIGKILL: a hung decode ignores anything gentler); its exit code."""
        code = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            code = self._proc.wait()
            self._proc = None
        for conn in (self._requests, self._replies):
            if conn is not None:
                conn.close()
        self._requests = self._replies = None
        return code

    def close(self) -> None:
        with self._lock:
            self._stop()


_DECODER: IsolatedDecoder | None = None
_DECODER_LOCK = threading.Lock()


def decode_file_isolated(
    path: str | Path, spec: ClipSpec, timeout_s: float, *, fault: str | None = None
) -> list[Clip]:
    """``decode_file`` in this process's decoder child, cut off after ``timeout_s``."""
    global _DECODER
    with _DECODER_LOCK:
        if _DECODER is None:
            _DECODER = IsolatedDecoder()
    return _DECODER.decode(path, spec, timeout_s, fault)

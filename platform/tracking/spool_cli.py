"""MLflow records a dead logger left unsent on this node: ``list`` them, or ``replay`` them now
(``python -m vitok.platform.tracking replay``; a logger's own spool is sent by the next logger
of the same server on its own)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vitok.platform.tracking import tracking_spool
from vitok.platform.tracking.run_logger import RunLogger


def replay(paths: list[Path], *, timeout_s: float) -> int:
    """Send the orphan spools of this node now: of the tracking servers ``paths`` name, or
    of every server. Returns 1 when something is still unsent (the server still away)."""
    folders = paths or tracking_spool.orphans()
    if not folders:
        print("[vitok.tracking] no undelivered MLflow records on this node")
        return 0
    left = 0
    for uri in sorted({(tracking_spool.read_meta(f) or {}).get("uri", "") for f in folders} - {""}):
        first = next(f for f in folders if (tracking_spool.read_meta(f) or {}).get("uri") == uri)
        logger = RunLogger(
            uri, (tracking_spool.read_meta(first) or {})["run_id"], flush_timeout_s=timeout_s
        )
        result = logger.close()
        left += sum(result["pending"].values())
    return 1 if left else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vitok.platform.tracking", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("list", help="undelivered records on this node")
    show.add_argument("--root", type=Path, default=None)
    send = sub.add_parser(
        "replay", help="send the undelivered records of every dead logger on this node now"
    )
    send.add_argument(
        "paths",
        nargs="*",
        type=Path,
        help="spool folders: send for their tracking servers only (default: every server)",
    )
    send.add_argument("--timeout", type=float, default=120.0, help="seconds to keep trying")
    args = parser.parse_args(argv)
    if args.command == "list":
        for folder in tracking_spool.orphans(args.root):
            meta = tracking_spool.read_meta(folder) or {}
            counts = tracking_spool.count_items(tracking_spool.pending_records(folder))
            what = tracking_spool.describe(counts)
            print(f"{folder}  run {meta.get('run_id')} at {meta.get('uri')}: {what}")
        return 0
    return replay(args.paths, timeout_s=args.timeout)

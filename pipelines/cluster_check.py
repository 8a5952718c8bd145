"""Check that every node of a Ray cluster runs the code this driver runs.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python pipelines/cluster_check.py
    python pipelines/cluster_check.py --import vitok.tokenizer.model   # local Ray

The driver maps ``vitok.*`` onto the shipped working_dir (``vitok.pipelines.cli``), runs one
task pinned to each alive node, and compares what each imported: the folder ``vitok.*``
came from and a fingerprint of its source files. Exits 1, naming the nodes, on a mismatch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import sys

from vitok.pipelines.cli import SHIPPED_ROOT
from vitok.platform.runtime import code_fingerprint, package_root, ray_runtime_env


def node_report(modules: list[str]) -> dict[str, str]:
    """Import ``modules`` here and describe the code this process runs."""
    for name in modules:
        importlib.import_module(name)
    return {
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "root": str(package_root()),
        "fingerprint": code_fingerprint(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--import",
        dest="modules",
        action="append",
        default=[],
        metavar="MODULE",
        help="also import this module on the driver and every node (repeatable)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for nodes")
    args = parser.parse_args(argv)

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(runtime_env=ray_runtime_env())
        else:
            ray.init(address="local", include_dashboard=False, runtime_env=ray_runtime_env())
    driver = node_report(args.modules)
    print(f"[vitok] shipped working_dir: {SHIPPED_ROOT or '(none: running the installed copy)'}")
    print(f"[vitok] driver {driver['host']} root={driver['root']} code={driver['fingerprint']}")

    remote = ray.remote(num_cpus=0, max_retries=0)(node_report)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    refs = [
        remote.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(args.modules)
        for n in nodes
    ]
    reports = ray.get(refs, timeout=args.timeout)
    bad = []
    for node, report in zip(nodes, reports):
        same = report["fingerprint"] == driver["fingerprint"]
        print(
            f"[vitok] node {node['NodeManagerAddress']} root={report['root']} "
            f"code={report['fingerprint']} {'ok' if same else 'DIFFERENT'}"
        )
        if not same:
            bad.append(node["NodeManagerAddress"])
    if bad:
        print(
            f"[vitok] code check FAILED: {', '.join(bad)} run other code than the driver "
            f"({driver['root']}). Submit with --working-dir, import vitok.pipelines.cli first "
            "and call ray.init(runtime_env=ray_runtime_env()) in the entry point.",
            file=sys.stderr,
        )
        return 1
    print(f"[vitok] code check passed: {len(nodes)} node(s) run code {driver['fingerprint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

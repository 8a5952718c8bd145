"""What a Ray cluster that scales up can ever provide, and asking its autoscaler for it.

On a cluster from ``ray up cluster.yaml`` the GPU node types start at ``min_workers: 0``, so
``ray.cluster_resources()`` on a fresh cluster shows no GPU at all: what matters before a
study starts is what the *node types* can provide, not what happens to be up now::

    from vitok.platform.study import cluster

    types = cluster.autoscaler_node_types()            # None: no autoscaler (laptop, fixed)
    live = cluster.live_node_resources()
    bundle = {"GPU": 1, "CPU": 8}                        # one Ray Train worker
    if not cluster.can_ever_fit(bundle, types, live):  # refuse before any compute
        ...
    if types is not None and not cluster.request_and_wait([bundle] * 8, timeout_s=1800):
        ...                                            # the GPUs never came: say so, stop

Where the node types come from (``autoscaler_node_types``), first hit wins:

1. an explicit ``path``, else ``$VITOK_AUTOSCALING_CONFIG``: that autoscaler config file;
2. the cluster config in Ray's GCS (``ray._private.state.state.get_cluster_config()``, what
   Ray Train V2 and Ray Data ask for the same question). Only autoscalers that report it fill
   it (KubeRay); the one ``ray up`` starts does not in Ray 2.60, so on cluster.yaml this is
   empty and the next source answers;
3. ``~/ray_bootstrap_config.yaml``: the file ``ray up`` writes on the head and starts the
   autoscaler with (``ray start --autoscaling-config=~/ray_bootstrap_config.yaml``). Job
   drivers run on the head, so they read it there.

No source: ``None`` (a laptop, or a cluster of machines started by hand that never grows).

Imports only the standard library, yaml and ray.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
import yaml

ENV_VAR = "VITOK_AUTOSCALING_CONFIG"
DEFAULT_CONFIG = "~/ray_bootstrap_config.yaml"
# Ray's own default for a config without a global max_workers (autoscaler/aws/defaults.yaml).
RAY_DEFAULT_MAX_WORKERS = 2
_EPS = 1e-9

# name -> {"resources": {"CPU": 192.0, "GPU": 8.0}, "min_workers": 0, "max_workers": 2,
#          "head": False}; max_workers may be math.inf (a node group without a bound).
NodeTypes = dict[str, dict[str, Any]]


# ----------------------------------------------------------------------------- node types
def autoscaler_node_types(path: str | None = None) -> NodeTypes | None:
    """The node types the cluster's autoscaler may start, or None without an autoscaler.

    Each entry has the declared ``resources`` of one node of that type (``{CPU: 192, GPU:
    8}``), ``min_workers``, ``max_workers`` and ``head`` (the head node's type). See the
    module docstring for where they come from.
    """
    explicit = path or os.environ.get(ENV_VAR)
    if explicit:
        return _node_types_from_file(Path(explicit).expanduser())
    from_gcs = _node_types_from_gcs()
    if from_gcs:
        return from_gcs
    return _node_types_from_file(Path(DEFAULT_CONFIG).expanduser())


def node_types_from_config(config: Mapping[str, Any]) -> NodeTypes | None:
    """The node types of a cluster config (``cluster.yaml`` or the bootstrap config).

    Per-type bounds default as Ray's own ``fill_node_type_min_max_workers`` does: a worker
    type without ``max_workers`` may grow to the global ``max_workers``, the head type to 0;
    no type may exceed the global bound.
    """
    types = config.get("available_node_types")
    if not isinstance(types, Mapping) or not types:
        return None
    head = config.get("head_node_type")
    global_max = config.get("max_workers", RAY_DEFAULT_MAX_WORKERS)
    out: NodeTypes = {}
    for name, spec in types.items():
        spec = spec or {}
        default_max = 0 if name == head else global_max
        max_workers = min(int(spec.get("max_workers", default_max)), int(global_max))
        out[str(name)] = {
            "resources": _floats(spec.get("resources") or {}),
            "min_workers": int(spec.get("min_workers", 0)),
            "max_workers": max_workers,
            "head": name == head,
        }
    return out


def _node_types_from_file(path: Path) -> NodeTypes | None:
    if not path.is_file():
        return None
    config = yaml.safe_load(path.read_text())
    return node_types_from_config(config) if isinstance(config, Mapping) else None


def _node_types_from_gcs() -> NodeTypes | None:
    """The node groups an autoscaler reported to the GCS (empty on ``ray up`` clusters)."""
    if not ray.is_initialized():
        return None
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # a private API: any change in it means "not available here"
        return None
    if config is None or not config.node_group_configs:
        return None
    out: NodeTypes = {}
    for group in config.node_group_configs:
        out[group.name] = {
            "resources": _floats(dict(group.resources)),
            "min_workers": int(group.min_count),
            "max_workers": math.inf if group.max_count == -1 else int(group.max_count),
            "head": False,
        }
    return out


def live_node_resources() -> list[dict[str, float]]:
    """The total resources of every node that is up now (Ray must be initialised)."""
    return [_floats(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


# ----------------------------------------------------------------------------- fitting
def max_resources_per_node(node_types: NodeTypes | None) -> list[dict[str, float]]:
    """The resources of one node of each type that can ever be up (the head's, and every
    worker type with ``max_workers > 0``)."""
    return [
        dict(t["resources"])
        for t in (node_types or {}).values()
        if t.get("head") or t.get("max_workers", 0) > 0
    ]


def fits(bundle: Mapping[str, float], node: Mapping[str, float]) -> bool:
    """Whether one node with these total resources can hold ``bundle``."""
    return all(float(node.get(k, 0.0)) + _EPS >= float(v) for k, v in bundle.items() if v > 0)


def can_ever_fit(
    bundle: Mapping[str, float],
    node_types: NodeTypes | None,
    live_nodes: Iterable[Mapping[str, float]] = (),
) -> bool:
    """Whether one worker's ``bundle`` fits on some node type or on some node up now."""
    nodes = [*max_resources_per_node(node_types), *live_nodes]
    return any(fits(bundle, node) for node in nodes)


def max_bundles(
    bundle: Mapping[str, float],
    node_types: NodeTypes | None,
    live_nodes: Iterable[Mapping[str, float]] = (),
) -> float:
    """How many copies of ``bundle`` the cluster could ever hold at once: the live nodes plus
    ``max_workers`` nodes of every worker type. Optimistic (a live worker counts once as live
    and once inside its type's bound; the global ``max_workers`` is not applied), so a study
    asking for more can be refused for certain; ``math.inf`` for an unbounded node group."""
    total = 0.0
    nodes: list[tuple[Mapping[str, float], float]] = [(n, 1) for n in live_nodes]
    for t in (node_types or {}).values():
        if not t.get("head"):
            nodes.append((t["resources"], t.get("max_workers", 0)))
    for node, count in nodes:
        per_node = _copies(bundle, node)
        if per_node > 0 and count > 0:
            if math.isinf(count) or math.isinf(per_node):
                return math.inf
            total += per_node * count
    return total


def _copies(bundle: Mapping[str, float], node: Mapping[str, float]) -> float:
    wanted = {k: float(v) for k, v in bundle.items() if v > 0}
    if not wanted:
        return math.inf
    return min(math.floor((float(node.get(k, 0.0)) + _EPS) / v) for k, v in wanted.items())


# ----------------------------------------------------------------------------- autoscaler
def describe_bundles(bundles: Sequence[Mapping[str, float]]) -> str:
    """``8 x {GPU: 1, CPU: 8}`` (``+`` between different shapes)."""
    shapes: dict[tuple[tuple[str, float], ...], int] = {}
    for bundle in bundles:
        key = tuple(sorted(((k, float(v)) for k, v in bundle.items()), key=_resource_order))
        shapes[key] = shapes.get(key, 0) + 1
    parts = []
    for key, count in shapes.items():
        inner = ", ".join(f"{k}: {v:g}" for k, v in key)
        parts.append(f"{count} x {{{inner}}}")
    return " + ".join(parts) or "nothing"


def request_and_wait(
    bundles: Sequence[Mapping[str, float]],
    timeout_s: float,
    *,
    poll_s: float = 10.0,
    log: Callable[[str], None] | None = None,
    keep: bool = False,
) -> bool:
    """Ask the autoscaler for ``bundles`` and wait until the cluster holds them.

    Calls ``ray.autoscaler.sdk.request_resources(bundles=...)``, then every ``poll_s``
    seconds compares ``ray.cluster_resources()`` with the bundles' totals and logs one timed
    line (``[vitok] waiting for the autoscaler: 8 x {GPU: 1, CPU: 8} requested, 2 of 8 GPUs,
    16 of 64 CPUs up, 60 s elapsed (timeout 1800 s)``). Returns True once they are up, False
    when ``timeout_s`` passes first; never waits longer than that.

    A request stays in force until the next one and keeps the nodes it asked for from being
    scaled down, so it is withdrawn on return, unless ``keep=True`` and the resources came:
    then the caller withdraws it with ``release_request()`` when the study ends. Nothing is
    requested when the cluster already holds the bundles.
    """
    from ray.autoscaler import sdk

    say = log or _print
    wanted = [_floats(b) for b in bundles]
    need = _totals(wanted)
    what = describe_bundles(wanted)
    start = time.monotonic()
    if _holds(ray.cluster_resources(), need):
        return True
    sdk.request_resources(bundles=wanted)
    came = False
    try:
        while True:
            have = ray.cluster_resources()
            elapsed = time.monotonic() - start
            if _holds(have, need):
                came = True
                say(f"[vitok] the autoscaler brought up {what} after {elapsed:.0f} s")
                return True
            if elapsed >= timeout_s:
                say(
                    f"[vitok] gave up waiting for the autoscaler after {elapsed:.0f} s: {what} "
                    f"requested, {_up(have, need)}. `ray status` on the head says why (no "
                    "capacity or quota for the instance type, a missing instance profile, ...); "
                    "the monitor log is /tmp/ray/session_latest/logs/monitor.log"
                )
                return False
            say(
                f"[vitok] waiting for the autoscaler: {what} requested, {_up(have, need)}, "
                f"{elapsed:.0f} s elapsed (timeout {timeout_s:.0f} s)"
            )
            time.sleep(max(0.0, min(max(poll_s, 0.01), timeout_s - elapsed)))
    finally:
        if not (came and keep):
            release_request(log=say)


def release_request(log: Callable[[str], None] | None = None) -> None:
    """Withdraw this cluster's standing ``request_resources`` (idle nodes may scale down)."""
    from ray.autoscaler import sdk

    try:
        sdk.request_resources(bundles=[])
    except Exception as err:  # the cluster may be going away; never mask the real outcome
        (log or _print)(f"[vitok] could not withdraw the autoscaler request: {err}")


# ----------------------------------------------------------------------------- helpers
def _print(message: str) -> None:
    print(message, flush=True)  # a job driver's stdout is a file: flush every line


def _floats(resources: Mapping[str, Any]) -> dict[str, float]:
    return {str(k): float(v) for k, v in resources.items()}


def _totals(bundles: Iterable[Mapping[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in bundles:
        for k, v in bundle.items():
            total[k] = total.get(k, 0.0) + float(v)
    return total


def _holds(have: Mapping[str, float], need: Mapping[str, float]) -> bool:
    return all(float(have.get(k, 0.0)) + _EPS >= v for k, v in need.items() if v > 0)


def _resource_order(item: tuple[str, float]) -> tuple[int, str]:
    order = {"GPU": 0, "CPU": 1}
    return (order.get(item[0], 2), item[0])


def _up(have: Mapping[str, float], need: Mapping[str, float]) -> str:
    parts = []
    for k, v in sorted(need.items(), key=_resource_order):
        label = f"{k}s" if k in ("GPU", "CPU") else k
        parts.append(f"{float(have.get(k, 0.0)):g} of {v:g} {label}")
    return ", ".join(parts) + " up"


__all__ = [
    "ENV_VAR",
    "DEFAULT_CONFIG",
    "NodeTypes",
    "autoscaler_node_types",
    "node_types_from_config",
    "live_node_resources",
    "max_resources_per_node",
    "fits",
    "can_ever_fit",
    "max_bundles",
    "describe_bundles",
    "request_and_wait",
    "release_request",
]

"""Run the code a Ray job shipped, not a stale installed copy.

``ray job submit --working-dir . -- python pipelines/scaling_study.py`` unpacks the repo on
every node and puts it first on ``PYTHONPATH``. That alone is not enough: ``vitok.*`` is a
namespace mapped onto the repo folders by the (editable) install, so ``import vitok.tokenizer``
would still load the copy installed when the cluster came up. ``use_shipped_code()`` maps the
packages onto the shipped folders instead; entry points call it before any other vitok
import, and ``ray_runtime_env()`` makes every Ray worker of the job call it before it
unpickles anything::

    from vitok.platform.runtime import use_shipped_code, ray_runtime_env

    def main() -> int:
        use_shipped_code()          # first, before importing other vitok modules
        ...
        ray.init(runtime_env=ray_runtime_env())

The entry points in ``pipelines/`` get the first call from their first vitok import,
``vitok.pipelines.cli``, which calls it before it loads anything else.

Outside a Ray job (no repo on ``PYTHONPATH``) both are no-ops: the installed copy is the code.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

# vitok package -> repo folder (pyproject.toml's [tool.setuptools.package-dir]).
PACKAGES: dict[str, str] = {
    "vitok.platform": "platform",
    "vitok.layers": "layers",
    "vitok.tokenizer": "tokenizer",
    "vitok.generator": "generator",
    "vitok.pipelines": "pipelines",
}
# The hook Ray runs first in every worker process of a job (see ray_runtime_env).
SETUP_HOOK = "vitok.platform.runtime.use_shipped_code"


class _ShippedFinder(importlib.abc.MetaPathFinder):
    """Resolves the vitok packages to ``root/<folder>``; submodules follow ``__path__``."""

    def __init__(self, root: Path) -> None:
        self.vitok_root = root

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        folder = PACKAGES.get(fullname)
        if folder is None:
            return None
        pkg = self.vitok_root / folder
        init = pkg / "__init__.py"
        if init.is_file():
            return importlib.util.spec_from_file_location(
                fullname, init, submodule_search_locations=[str(pkg)]
            )
        # A namespace folder (platform/ has no __init__.py by design).
        spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
        spec.submodule_search_locations = [str(pkg)]
        return spec


def is_repo(path: Path) -> bool:
    """True when ``path`` is a checkout of this project (pyproject names vitok, folders exist)."""
    pyproject = path / "pyproject.toml"
    if not pyproject.is_file() or not all((path / f).is_dir() for f in PACKAGES.values()):
        return False
    return 'name = "vitok"' in pyproject.read_text(errors="replace")


def shipped_root() -> Path | None:
    """The repo a Ray job put on ``PYTHONPATH`` (its unpacked working_dir), else None."""
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and is_repo(Path(entry)):
            return Path(entry).resolve()
    return None


def _origin(module: ModuleType) -> list[Path]:
    """The folders (or file) a module was loaded from."""
    paths = getattr(module, "__path__", None)
    if paths is not None:
        return [Path(p).resolve() for p in paths]
    file = getattr(module, "__file__", None)
    return [Path(file).resolve()] if file else []


def _loaded(prefixes: tuple[str, ...]) -> list[str]:
    return [
        name
        for name in list(sys.modules)
        if any(name == p or name.startswith(p + ".") for p in prefixes)
    ]


def use_shipped_code(
    root: Path | str | None = None, *, importing: str | None = None
) -> Path | None:
    """Map the ``vitok.*`` packages (``PACKAGES``) onto ``root`` (default: the job's).

    Returns the root in use, or None when there is nothing to map (no repo on PYTHONPATH).
    Idempotent. Raises ``RuntimeError`` when a vitok module other than this one was already
    imported from another copy: that module would be stale, so the caller must call this first.

    ``importing`` names the module that calls this while it is itself being imported (the
    entry points' launcher, ``vitok.pipelines.cli``). That module keeps its ``sys.modules``
    entry, as its import is still under way; it comes from whichever copy was found first,
    so it must hold no logic of its own.
    """
    root = Path(root).resolve() if root is not None else shipped_root()
    if root is None:
        return None
    for finder in sys.meta_path:
        if getattr(finder, "vitok_root", None) == root:
            return root
    stale = []
    for name in _loaded(tuple(PACKAGES)):
        if name in (__name__, importing) or name in PACKAGES:
            continue  # the modules already running, and the package objects (replaced)
        folder = root / PACKAGES[".".join(name.split(".")[:2])]
        if not all(p.is_relative_to(folder) for p in _origin(sys.modules[name])):
            stale.append(f"{name} ({sys.modules[name].__file__})")
    if stale:
        raise RuntimeError(
            f"use_shipped_code(): these vitok modules were imported before it, from a copy other "
            f"than the shipped code in {root}: {', '.join(sorted(stale))}. Call "
            "vitok.platform.runtime.use_shipped_code() before any other vitok import."
        )
    for name in _loaded(tuple(PACKAGES)):
        # Re-imported from root on next use; this running function needs no module entry.
        if name != importing:
            del sys.modules[name]
    vitok = sys.modules.get("vitok")
    for attr in (name.removeprefix("vitok.") for name in PACKAGES):
        if vitok is not None and hasattr(vitok, attr):
            delattr(vitok, attr)
    sys.meta_path.insert(0, _ShippedFinder(root))
    importlib.invalidate_caches()
    return root


def ray_runtime_env(env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """A ``ray.init(runtime_env=...)`` that runs ``use_shipped_code`` in every worker first.

    Merged by Ray with the job's own runtime_env (its working_dir), so the two never conflict.
    """
    runtime_env: dict[str, Any] = {"worker_process_setup_hook": SETUP_HOOK}
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    return runtime_env


def package_root(package: str = "vitok.tokenizer") -> Path:
    """The repo folder a vitok package was imported from (its parent)."""
    module = importlib.import_module(package)
    return _origin(module)[0].parent


def code_fingerprint(root: Path | str | None = None) -> str:
    """sha256 (16 hex digits) over every ``*.py`` file of the package folders under root.

    ``root`` defaults to where ``vitok.tokenizer`` was imported from, so two processes that
    print the same fingerprint run the same code.
    """
    root = Path(root) if root is not None else package_root()
    digest = hashlib.sha256()
    for folder in sorted(PACKAGES.values()):
        for path in sorted((root / folder).glob("*.py")):
            digest.update(f"{folder}/{path.name}\0".encode())
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()[:16]

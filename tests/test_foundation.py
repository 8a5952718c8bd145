"""The package layout, the layer boundary, and the stdlib `platform` not being shadowed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names)
PACKAGES_ON_DISK = ("platform", "layers", "tokenizer", "generator", "pipelines", "tests")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _check_layer(folder: str, allowed_prefixes: tuple[str, ...]) -> list[str]:
    """Every import in ``folder`` that is not stdlib, torch, einops or under an allowed prefix."""
    bad = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for name in _imports(path):
            top = name.split(".")[0]
            if top in STDLIB or top in ("torch", "einops"):
                continue
            if any(name == p or name.startswith(p + ".") for p in allowed_prefixes):
                continue
            bad.append(f"{path.relative_to(REPO)} imports {name}")
    return bad


def test_layers_import_only_torch_einops_and_stdlib():
    assert _check_layer("layers", ("vitok.layers",)) == []


def test_tokenizer_imports_only_torch_einops_stdlib_and_layers():
    # Not the generator either: the models share vitok.layers, never each other.
    assert _check_layer("tokenizer", ("vitok.tokenizer", "vitok.layers")) == []


def test_generator_imports_only_torch_einops_stdlib_and_layers():
    # Not the tokenizer either: the models share vitok.layers, never each other.
    assert _check_layer("generator", ("vitok.generator", "vitok.layers")) == []


def test_platform_imports_no_model_package():
    """platform/ is generic: no vitok import but its own (no tokenizer, generator, layers)."""
    bad = [b for b in _check_layer("platform", ("vitok.platform",)) if "vitok." in b]
    assert bad == []


# platform/'s subpackages, and the ones each may import (besides the root modules config,
# storage and runtime, which import none of them): arrows point one way.
PLATFORM_LAYERS = {
    "data": set(),
    "tracking": set(),
    "metrics": {"data", "tracking"},
    "training": {"data", "tracking"},
    "study": {"data", "tracking", "metrics", "training"},
}


def _platform_graph() -> dict[str, set[str]]:
    """vitok.platform module -> the vitok.platform modules it imports anywhere (top level,
    inside functions, under TYPE_CHECKING)."""
    modules = {}
    for path in (REPO / "platform").rglob("*.py"):
        parts = path.relative_to(REPO / "platform").with_suffix("").parts
        name = ".".join(("vitok.platform",) + (parts[:-1] if parts[-1] == "__init__" else parts))
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def test_platform_modules_import_no_circle():
    """No module of vitok.platform imports, at any depth, a module that imports it."""
    graph = _platform_graph()

    def reaches(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return seen

    circles = sorted(m for m in graph if m in reaches(m))
    assert circles == []


def test_platform_subpackages_import_one_way():
    graph = _platform_graph()
    group = lambda m: m.split(".")[2] if m.count(".") >= 3 else None  # noqa: E731
    assert {group(m) for m in graph} - {None} == set(PLATFORM_LAYERS)
    bad = []
    for module, deps in graph.items():
        mine = group(module)
        for dep in deps:
            other = group(dep)
            if mine is None and other is not None:
                bad.append(f"{module} (a root module) imports {dep}")
            elif None not in (mine, other) and other != mine and other not in PLATFORM_LAYERS[mine]:
                bad.append(f"{module} imports {dep}")
    assert bad == []


def test_platform_subpackages_say_what_they_own():
    """Each subpackage opens with what it owns and what it may import; platform/ itself has no
    __init__.py (it would shadow the stdlib module `platform` on a job's sys.path)."""
    assert not (REPO / "platform" / "__init__.py").exists()
    for name in PLATFORM_LAYERS:
        doc = ast.get_docstring(ast.parse((REPO / "platform" / name / "__init__.py").read_text()))
        assert doc and "Owns" in doc and "Imports:" in doc, name


# The scripts a user runs, locally or as a Ray job (`python pipelines/X.py`). model_stats.py
# (meta-device counts) and benchmark.py (local figures) run no job and may import directly.
ENTRY_POINTS = (
    "scaling_study",
    "train_tokenizer",
    "train_generator",
    "preprocess",
    "cluster_check",
)
LAUNCHER = "vitok.pipelines.cli"


def _module_imports(path: Path) -> list[str]:
    """The modules a file imports at its top level, in order."""
    names = []
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_entry_points_import_the_launcher_before_any_other_vitok_module():
    """So use_shipped_code() runs first in a Ray job, with plain imports (no E402)."""
    scripts = {p.stem for p in (REPO / "pipelines").glob("*.py") if "__main__" in p.read_text()}
    assert scripts - set(ENTRY_POINTS) == {"model_stats", "benchmark"}
    for name in ENTRY_POINTS:
        vitok = [m for m in _module_imports(REPO / "pipelines" / f"{name}.py") if "vitok" in m]
        assert vitok[0] == LAUNCHER, (name, vitok[:3])


# Stages: one per trained model, each a recipe of calls that owns its MLflow run. What two of
# them share lives in library modules (generation_eval, checkpoint_models, mlflow_model, ...).
STAGES = ("tokenizer_stage", "generator_stage")
SCRIPTS = (*ENTRY_POINTS, "model_stats", "benchmark")  # files with a __main__


def _pipeline_imports(name: str) -> set[str]:
    """The vitok.pipelines modules a pipelines file imports anywhere (top level or inside a
    function)."""
    return {m for m in _imports(REPO / "pipelines" / f"{name}.py") if "pipelines." in m}


def test_no_stage_imports_another_stage():
    assert sorted(p.stem for p in (REPO / "pipelines").glob("*_stage.py")) == sorted(STAGES)
    for name in STAGES:
        others = {f"vitok.pipelines.{s}" for s in STAGES if s != name}
        assert _pipeline_imports(name) & others == set(), name


def test_no_entry_point_imports_another_entry_point():
    for name in SCRIPTS:
        others = {f"vitok.pipelines.{s}" for s in SCRIPTS if s != name}
        assert _pipeline_imports(name) & others == set(), name


def test_no_file_over_450_lines_and_no_function_over_80_outside_tests():
    long_files, long_functions = [], []
    for folder in PACKAGES_ON_DISK[:-1]:  # not tests/
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            if len(text.splitlines()) > 450:
                long_files.append(str(path.relative_to(REPO)))
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    if node.end_lineno - node.lineno + 1 > 80:
                        long_functions.append(f"{path.relative_to(REPO)}:{node.name}")
    assert (long_files, long_functions) == ([], [])


def test_launcher_holds_no_logic_and_imports_only_the_runtime():
    """In a Ray job the launcher itself comes from the installed copy: nothing of it may run
    later (no functions, no classes), and it loads the rest only after the mapping."""
    path = REPO / "pipelines" / "cli.py"
    tree = ast.parse(path.read_text())
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    assert not [n for n in ast.walk(tree) if isinstance(n, defs)]
    vitok = [m for m in _module_imports(path) if "vitok" in m]
    assert vitok == ["vitok.platform.runtime"]


def test_no_e402_exemptions():
    needle = "noqa: E" + "402"  # spelled apart, so this file does not match itself
    files = [p for folder in PACKAGES_ON_DISK for p in (REPO / folder).rglob("*.py")]
    assert [str(p) for p in files if needle in p.read_text()] == []


def test_no_module_shadows_stdlib_platform():
    assert not (REPO / "platform" / "__init__.py").exists()
    # A Ray job puts its working_dir first on sys.path: the stdlib module must still win.
    code = "import platform, sys; print(platform.system()); import vitok.platform.config"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "Linux"


def test_importable_as_vitok_namespace():
    code = (
        "from vitok.platform import config; import vitok.layers, vitok.tokenizer, "
        "vitok.generator, vitok.pipelines; from importlib.metadata import version; "
        "print(version('vitok'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True
    )
    assert out.stdout.strip()


def test_wheel_contains_every_python_folder(tmp_path):
    """A built wheel holds only listed packages: a forgotten subfolder would silently vanish
    from `pip install .` and from code shipped to a cluster."""
    import zipfile

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = tmp_path.glob("vitok-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    from vitok.platform.runtime import PACKAGES

    mapping = {folder: package.replace(".", "/") for package, folder in PACKAGES.items()}
    # Every folder at the root with Python files is a listed package (tests/ is not shipped).
    folders = {p.parent.name for p in REPO.glob("*/*.py")} - {"tests"}
    folders = {f for f in folders if not f.startswith(".")}
    assert folders == set(mapping)
    missing = []
    for folder, package in mapping.items():
        for path in (REPO / folder).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            inside = f"{package}/{path.relative_to(REPO / folder).as_posix()}"
            if inside not in names:
                missing.append(inside)
    assert missing == []
    assert not any(n.startswith("vitok/__init__") for n in names)  # vitok stays a namespace


def test_architecture_page_names_every_package():
    """ARCHITECTURE.md's layer table lists each folder the boundary tests above check."""
    from vitok.platform.runtime import PACKAGES

    text = (REPO / "ARCHITECTURE.md").read_text()
    for package, folder in PACKAGES.items():
        assert f"| `{folder}/` | `{package}` |" in text, folder

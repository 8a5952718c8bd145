"""The package layout, the layer boundary, and the stdlib `platform` not being shadowed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names)


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


def test_tokenizer_imports_only_torch_and_einops():
    assert _check_layer("tokenizer", ("vitok.tokenizer",)) == []


def test_generator_imports_only_torch_and_einops():
    # The generator reuses the tokenizer's pure-torch transformer blocks (same Llama design)
    # and its EMA (one warm-up EMA class for both models); nothing else of the tokenizer.
    allowed = ("vitok.generator", "vitok.tokenizer.layers", "vitok.tokenizer.ema")
    assert _check_layer("generator", allowed) == []


def test_platform_never_imports_models():
    bad = [b for b in _check_layer("platform", ("vitok.platform",)) if "vitok." in b]
    assert bad == []


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
        "from vitok.platform import config; import vitok.tokenizer, vitok.generator, "
        "vitok.pipelines; from importlib.metadata import version; print(version('vitok'))"
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
    mapping = {
        "platform": "vitok/platform",
        "tokenizer": "vitok/tokenizer",
        "generator": "vitok/generator",
        "pipelines": "vitok/pipelines",
    }
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

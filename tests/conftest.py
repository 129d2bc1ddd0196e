"""Shared test fixtures: where `../shared` is, and skipping cleanly where it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDSEGX_SHARED", REPO.parent / "shared")).resolve()


def shared_path(*parts: str) -> Path:
    """Path under ../shared; skips the calling test with a clear reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data not found at {path} (set MEDSEGX_SHARED or place shared/ beside the repo)")
    return path


@pytest.fixture(scope="session")
def tiny_parity_dir() -> Path:
    return shared_path("reference", "tiny_parity")


@pytest.fixture(scope="session")
def example_db() -> Path:
    return shared_path("data", "MedSegDB-example")


@pytest.fixture(scope="session")
def real_db() -> Path:
    return shared_path("data", "MedSegDB-real")


@pytest.fixture(scope="session")
def taxonomy_official() -> Path:
    return shared_path("reference", "taxonomy_official.json")


@pytest.fixture(scope="session", autouse=True)
def _index_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The slice-index cache of the whole session in a temporary folder (never the user's ~/.cache),
    for this process and the scripts the tests start."""
    os.environ["MEDSEGX_CACHE_DIR"] = str(tmp_path_factory.mktemp("index-cache"))

"""Shared fixtures: small phantom datasets written to temporary folders, and the real data path."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("nnUNet_def_n_proc", "1")


@pytest.fixture(autouse=True, scope="session")
def _step_time_cache(tmp_path_factory):
    """Measured training-step times go to a session folder, not the user's cache."""
    os.environ["SPINELM_CACHE"] = str(tmp_path_factory.mktemp("spinelm_cache"))

#: Real annotated scans (see ../shared/data/README.md); tests that need them skip when absent.
DATA_ROOT = Path(os.environ.get("SPINELM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def real_data(*parts: str) -> Path:
    path = DATA_ROOT.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory) -> Path:
    """Four labelled MR phantoms + one unlabelled, written once per session (read-only use)."""
    from spinelm.synthetic import PhantomConfig, synthesize_dataset

    out = tmp_path_factory.mktemp("phantoms") / "ds"
    synthesize_dataset(out, 4, seed=7, config=PhantomConfig(modality="MR", max_vertebrae=8, max_voxels=600_000),
                       n_unlabelled=1, progress=False)
    return out


@pytest.fixture
def phantom_copy(phantom_dataset, tmp_path) -> Path:
    """A private copy of the phantom dataset that a test may break."""
    dst = tmp_path / "ds"
    shutil.copytree(phantom_dataset, dst)
    return dst

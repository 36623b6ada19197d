"""Test setup: CPU only, 8 simulated devices (set before JAX is imported anywhere), shared fixtures."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_base_dir(tmp_path_factory, monkeypatch):
    """Every test gets its own NANOCHAT_JAX_BASE_DIR, so nothing touches ~/.cache."""
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(tmp_path_factory.mktemp("base")))
    monkeypatch.delenv("NANOCHAT_JAX_DATA_DIR", raising=False)


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test, saying what is missing and where it should be."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        what = "/".join(("shared", "data") + parts)
        pytest.skip(f"needs ../{what} beside the checkout ({path} is missing): the project's folder of public "
                    f"datasets (task files, Gutenberg parquet shards, the CORE bundle; see shared/data/README.md), "
                    f"which is not part of the repository. Put it there to run this test")
    return path

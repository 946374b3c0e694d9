from __future__ import annotations

import pytest

import wanfast.builder
from wanfast.specs import SPECS
from wanfast.tools.testing import write_diffusers_checkpoint, write_official_checkpoint


@pytest.fixture(scope="session")
def tiny_official(tmp_path_factory):
    """The tiny preset written in the official Wan2.2 layout (fp32 weights)."""
    return write_official_checkpoint(tmp_path_factory.mktemp("official"), SPECS["tiny"], seed=7)


@pytest.fixture(scope="session")
def tiny_diffusers(tmp_path_factory):
    """The same weights as ``tiny_official``, in the Diffusers layout."""
    return write_diffusers_checkpoint(tmp_path_factory.mktemp("diffusers"), SPECS["tiny"], seed=7)


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if anything tries to load or build models (checks that must come first)."""

    def boom(*a, **k):
        raise AssertionError("models were loaded for an invalid request")

    monkeypatch.setattr(wanfast.builder, "build", boom)


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster (``pgcluster.PostgresCluster``) for the session. Without Debian's
    server binaries the PostgreSQL tests skip, loudly; on CI (``CI`` set, where .ci/run installs them) they
    fail instead."""
    import os
    import warnings

    from pgcluster import PostgresCluster, server_bin

    pytest.importorskip("psycopg", reason="the postgres extra: pip install 'wanfast[postgres]'")
    bindir = server_bin()
    if bindir is None:
        message = (
            "PostgreSQL server binaries not found (/usr/lib/postgresql/N/bin): apt-get install postgresql"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        warnings.warn(f"SKIPPING the PostgreSQL job-store tests: {message}", stacklevel=1)
        pytest.skip(message)
    cluster = PostgresCluster(bindir).start()
    yield cluster
    cluster.stop()

from __future__ import annotations

import pytest

from wanfast.config import PRESETS
from wanfast.testing import write_diffusers_checkpoint, write_official_checkpoint


@pytest.fixture(scope="session")
def tiny_official(tmp_path_factory):
    """The tiny preset written in the official Wan2.2 layout (fp32 weights)."""
    return write_official_checkpoint(tmp_path_factory.mktemp("official"), PRESETS["tiny"], seed=7)


@pytest.fixture(scope="session")
def tiny_diffusers(tmp_path_factory):
    """The same weights as ``tiny_official``, in the Diffusers layout."""
    return write_diffusers_checkpoint(tmp_path_factory.mktemp("diffusers"), PRESETS["tiny"], seed=7)

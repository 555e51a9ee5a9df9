"""Shared fixtures and the session's environment; plain helpers are in ``helpers.py``."""

import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch

from tests.helpers import write_market

# The image-check cache of every trainer a test builds (subprocesses inherit it), not ~/.cache;
# removed when the test session ends.
_CACHE = tempfile.mkdtemp(prefix="reidzoo-test-cache-")
os.environ.setdefault("REIDZOO_CACHE", _CACHE)
atexit.register(shutil.rmtree, _CACHE, True)


@pytest.fixture(scope="session")
def tiny_market(tmp_path_factory):
    """A tiny Market-1501 folder (:func:`tests.helpers.write_market`) shared by the session."""
    return write_market(str(tmp_path_factory.mktemp("market")))


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    np.random.seed(0)

"""Shared fixtures and the session's environment; plain helpers are in ``helpers.py``."""

import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch

from tests.helpers import (  # noqa: F401  (re-exported while test files move to tests.helpers)
    NO_AUGMENTATION,
    REPO,
    SHARED_DATA,
    TINY_SYNTH,
    TRAIN_IDS_TESTSET,
    evaluate_on_training_ids,
    fix_batch,
    run_steps,
    tiny_cfg,
    train_then_eval_only,
    write_market,
    write_training_ids_testset,
)

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

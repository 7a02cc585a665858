import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch


def pytest_configure(config):
    """Under ``-n 2`` each xdist worker computes on one thread (and so do the processes it starts): two workers of
    two threads each on this 2-core machine made the quick tier 110 s instead of 70 s."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def run_client() -> Callable[..., object]:
    """``tests/export/_client.py``'s ``run_client``: code run in a Python process that cannot import mmlm."""
    spec = importlib.util.spec_from_file_location("_client", Path(__file__).parent / "export" / "_client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run_client

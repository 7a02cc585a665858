import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest
import torch


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

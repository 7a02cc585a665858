"""The export tests' client process really cannot import mmlm."""

import pytest
from _client import run_client


@pytest.mark.slow
def test_client_process_cannot_import_mmlm(tmp_path):
    assert run_client("import json, torch; print(json.dumps(torch.__version__.split('.')[0]))", tmp_path) == "2"
    with pytest.raises(AssertionError, match="do not import mmlm"):
        run_client("import mmlm", tmp_path)


def test_client_process_can_refuse_torch_too(tmp_path):
    """The ONNX clients: neither torch nor mmlm, while numpy still imports."""
    assert run_client("import json, numpy; print(json.dumps(numpy.float32(1.5).item()))", tmp_path,
                      refuse=("mmlm", "torch")) == 1.5  # fmt: skip
    for name in ("torch", "torch.nn", "mmlm.serve"):  # a submodule imports its package first: that is refused
        top = name.partition(".")[0]
        with pytest.raises(AssertionError, match=f"without {top}: do not import {top}"):
            run_client(f"import {name}", tmp_path, refuse=("mmlm", "torch"))

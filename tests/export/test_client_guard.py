"""The export tests' client process really cannot import mmlm."""

import pytest
from _client import run_client


@pytest.mark.slow
def test_client_process_cannot_import_mmlm(tmp_path):
    assert run_client("import json, torch; print(json.dumps(torch.__version__.split('.')[0]))", tmp_path) == "2"
    with pytest.raises(AssertionError, match="do not import mmlm"):
        run_client("import mmlm", tmp_path)

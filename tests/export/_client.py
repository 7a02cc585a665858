"""Run an ecosystem's own loading code in a fresh Python process that cannot import mmlm.

The export tests hand the files mmlm wrote to transformers / open_clip / timm /
sentence-transformers / CLIP_benchmark exactly as their users would: in a process where
``import mmlm`` fails, offline, and read back what that code computed as JSON or a
``.pt`` / ``.npy`` file in a temp folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

_GUARD_TEMPLATE = """
import sys

class _Refuse:
    REFUSED = {refused!r}

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in self.REFUSED:
            raise ImportError("this process checks an export without " + top + ": do not import " + name)
        return None

sys.meta_path.insert(0, _Refuse())
"""


def guard(refuse: tuple[str, ...] = ("mmlm",)) -> str:
    """Python source that makes importing any of the packages ``refuse`` (and their submodules) fail."""
    return _GUARD_TEMPLATE.format(refused=tuple(refuse))


_GUARD = guard()  # no mmlm: what every export client runs under


def offline_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def run_client(
    code: str, cwd: str | Path, timeout: float = 600, refuse: tuple[str, ...] = ("mmlm",), **env: str
) -> Any:
    """Run ``code`` (dedented) without mmlm in ``cwd``; it must ``print(json.dumps(...))`` its
    result as the last line of stdout, which is returned parsed. ``refuse``: the packages the process
    cannot import (``("mmlm", "torch")`` for a client of the ONNX export)."""
    script = Path(cwd) / "client.py"
    script.write_text(guard(refuse) + textwrap.dedent(code), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=cwd, env=offline_env(**env), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"client process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, f"client printed nothing; stderr:\n{proc.stderr[-2000:]}"
    return json.loads(lines[-1])


def run_command(args: list[str], cwd: str | Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """Run another program (e.g. the ``clip_benchmark`` CLI) offline; raises with its stderr on failure."""
    proc = subprocess.run(args, cwd=cwd, env=offline_env(**env), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc

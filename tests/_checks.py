"""Checks shared by the tests of what mmlm writes and refuses (importable: tests/ is on sys.path)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mmlm.cli import main


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def error_line(capsys, *args: str) -> str:
    """``mmlm ARGS`` in this process: exit 2 and exactly one stderr line, no traceback; that line."""
    with pytest.raises(SystemExit) as e:
        main(list(args))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]

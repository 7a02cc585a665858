"""Every third-party module that mmlm/, tests/ or scripts/ imports comes from a distribution mmlm declares
directly (a dependency or an extra), not one that happens to arrive with another package: a fresh
`pip install -e ".[dev]"` is then enough to run everything, and an upstream change to what a package pulls
in cannot break the install.

Imports are read with ast, inside functions too, and also from the Python code the tests hand to other
processes as strings (tests/export/_client.py runs such code). The declared requirements are read from the
installed metadata (`importlib.metadata.requires("mmlm")`), which works on every supported Python.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

THIS = Path(__file__).resolve()
ROOT = THIS.parents[1]
FOLDERS = ("mmlm", "tests", "scripts")
# standard library from Python 3.11 (not in 3.10's sys.stdlib_module_names); imported only where it exists
NEWER_STDLIB = {"tomllib"}


def norm(name: str) -> str:
    """A distribution name as PEP 503 compares it: PyYAML, pyyaml and py_yaml are one name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return norm(re.split(r"[ ;<>=!~\[(@]", requirement.strip(), maxsplit=1)[0])


def declared_distributions() -> set[str]:
    """The distributions mmlm's installed metadata names: its dependencies and every extra's."""
    return {requirement_name(r) for r in metadata.requires("mmlm") or []}


def module_providers() -> dict[str, set[str]]:
    """Top-level module -> the installed distributions that provide it, as Python 3.11's
    ``importlib.metadata.packages_distributions()`` finds them: a distribution's top_level.txt, else the top
    folders and modules of the files it installed. (3.10's reads top_level.txt only, which many wheels, torch's
    and numpy's among them, no longer carry.)"""
    providers: dict[str, set[str]] = {}
    for dist in metadata.distributions():
        modules = (dist.read_text("top_level.txt") or "").split()
        if not modules:
            files = dist.files or []
            tops = {f.parts[0] if len(f.parts) > 1 else inspect.getmodulename(f.name) or f.name for f in files}
            modules = [name for name in tops if "." not in name]
        for module in modules:
            providers.setdefault(module, set()).add(norm(dist.metadata["Name"]))
    return providers


def imported_modules(source: str) -> set[str]:
    """Top-level names of the absolute imports in ``source``, including the code of string constants that
    parse as Python with an import in them (code run in another process)."""
    tree = ast.parse(source)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "import " in node.value:
            try:
                found |= imported_modules(textwrap.dedent(node.value))
            except SyntaxError:  # prose, not code
                pass
    return found


def third_party_imports(root: Path) -> dict[str, set[str]]:
    """Module -> the files (relative to ``root``) that import it, leaving out the standard library, mmlm
    and the helper modules of tests/ and scripts/ (``_client``, ``_parity``, ``bench_retrieval``, ...)."""
    # this file is left out: its fixture below writes fake imports on purpose
    files = sorted(f for folder in FOLDERS for f in (root / folder).rglob("*.py") if f.resolve() != THIS)
    own = {"mmlm"} | {f.stem for f in files if f.relative_to(root).parts[0] != "mmlm"}
    found: dict[str, set[str]] = {}
    for f in files:
        for module in imported_modules(f.read_text(encoding="utf-8")):
            if module not in sys.stdlib_module_names and module not in NEWER_STDLIB | own:
                found.setdefault(module, set()).add(f.relative_to(root).as_posix())
    return found


def undeclared(imports: dict[str, set[str]], declared: set[str], providers: dict[str, set[str]]) -> list[str]:
    """One line per imported module that no declared distribution provides."""
    problems = []
    for module, files in sorted(imports.items()):
        where = ", ".join(sorted(files))
        dists = providers.get(module)
        if not dists:
            problems.append(f"{module}: no installed distribution provides it (imported by {where})")
        elif not dists & declared:
            problems.append(f"{module}: comes from {', '.join(sorted(dists))}, which mmlm does not declare directly "
                            f"in pyproject.toml (imported by {where})")  # fmt: skip
    return problems


def test_every_imported_module_is_declared():
    problems = undeclared(third_party_imports(ROOT), declared_distributions(), module_providers())
    assert not problems, "undeclared imports:\n" + "\n".join(problems)


def test_a_module_that_arrives_only_with_another_package_is_reported(tmp_path):
    # huggingface_hub comes with transformers but mmlm does not declare it: importing it must be reported,
    # with the file; stdlib, relative, own and test-helper imports must not.
    assert "huggingface-hub" in module_providers()["huggingface_hub"]
    assert "huggingface-hub" not in declared_distributions()
    (tmp_path / "mmlm").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "scripts").mkdir()
    (tmp_path / "mmlm" / "hub.py").write_text(
        "import os\nfrom . import sibling\nimport mmlm.config\n\n\ndef load():\n"
        "    from huggingface_hub import hf_hub_download\n"
    )
    (tmp_path / "tests" / "_helper.py").write_text("import torch\n")
    (tmp_path / "tests" / "test_x.py").write_text(
        'import _helper\nimport pytest\nCODE = """\nimport not_a_module_anywhere\nprint(1)\n"""\n'
    )
    imports = third_party_imports(tmp_path)
    assert imports == {
        "huggingface_hub": {"mmlm/hub.py"},
        "torch": {"tests/_helper.py"},
        "pytest": {"tests/test_x.py"},
        "not_a_module_anywhere": {"tests/test_x.py"},
    }
    assert undeclared(imports, declared_distributions(), module_providers()) == [
        "huggingface_hub: comes from huggingface-hub, which mmlm does not declare directly in pyproject.toml "
        "(imported by mmlm/hub.py)",
        "not_a_module_anywhere: no installed distribution provides it (imported by tests/test_x.py)",
    ]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="reads pyproject.toml with tomllib (Python 3.11+)")
def test_installed_metadata_matches_pyproject():
    """The check above reads the installed metadata: a pyproject.toml edited since the install would make it
    check stale requirements. Names and extras must agree."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    in_pyproject = {(requirement_name(r), None) for r in project["dependencies"]}
    for extra, requirements in project["optional-dependencies"].items():
        in_pyproject |= {(requirement_name(r), extra) for r in requirements}
    installed = set()
    for r in metadata.requires("mmlm") or []:
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", r)
        installed.add((requirement_name(r), extra and extra.group(1)))
    assert installed == in_pyproject, (
        "the installed metadata is stale (reinstall: pip install -e '.[dev]'): "
        f"only installed {sorted(installed - in_pyproject, key=str)}, "
        f"only in pyproject.toml {sorted(in_pyproject - installed, key=str)}"
    )

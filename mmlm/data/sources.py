"""The kinds of data source every mmlm dataset argument takes, told apart in one place.

Training (``train_data`` / ``val_data`` / ``test_data`` of the data modules) and evaluation
(``mmlm zeroshot`` / ``mmlm eval-retrieval``) read the same kinds:

===================================  ===================================================================
``digits``                           scikit-learn's 1,797 handwritten digits (``train`` / ``test`` split)
a folder of class folders            torchvision's ImageFolder layout (classification)
``*.csv`` / ``*.tsv`` / ``*.jsonl``  a manifest: ``filepath`` + ``label`` rows (classification), or
                                     ``filepath`` + ``title`` rows, one per caption (retrieval: repeat
                                     the filepath for several captions of one image)
``*.tar``, ``data/{0..9}.tar``       WebDataset shards: an image member plus ``cls`` (an integer label)
                                     or ``txt`` (captions, one per line) or ``json`` (``caption``: a
                                     string or a list)
a CLIP_benchmark ``wds`` folder      ``{split}/nshards.txt``, ``{split}/0.tar ...``, ``classnames.txt``,
                                     ``zeroshot_classification_templates.txt`` (``clip_benchmark_export_wds``)
===================================  ===================================================================

Relative paths starting with ``assets/`` name the bundled samples from any working folder
(``mmlm.paths.resolve``).
"""

from __future__ import annotations

from pathlib import Path

from mmlm.data.digit_scans import DIGIT_CLASSNAMES, DIGIT_TEMPLATES
from mmlm.paths import resolve

DIGITS = "digits"  # scikit-learn's handwritten digits, shipped with scikit-learn


def is_digits(spec: str | Path | None) -> bool:
    return str(spec) == DIGITS


def is_shards(spec: str | Path) -> bool:
    """Names WebDataset shards without touching the disk: a ``.tar`` pattern or a ``pipe:`` command."""
    return ".tar" in str(spec) or str(spec).startswith("pipe:")


def locate(spec: str | None) -> str | None:
    """``spec`` with ``assets/...``, ``package:...`` and ``~`` expanded (``mmlm.paths.resolve``);
    ``digits``, URLs and ``pipe:`` commands as given."""
    if spec is None or is_digits(spec) or str(spec).startswith("pipe:") or "://" in str(spec):
        return spec
    return str(resolve(spec))


def find_shards(spec: str | Path, split: str = "test") -> tuple[list[str], Path] | None:
    """(shard urls, folder of the metadata files) when ``spec`` names WebDataset shards, else None."""
    text = str(spec)
    path = resolve(text)
    if path.is_dir():
        nshards = path / split / "nshards.txt"
        if nshards.is_file():  # CLIP_benchmark's layout
            n = int(nshards.read_text().strip())
            return [str(path / split / f"{i}.tar") for i in range(n)], path
        tars = sorted(str(p) for p in path.glob("*.tar"))
        return (tars, path) if tars else None
    if is_shards(text):
        from mmlm.data.webdataset import expand_urls  # here: it imports torch, and `is_digits` callers need none

        urls = expand_urls(text)
        return urls, Path(urls[0]).parent
    return None


def metadata(folder: Path, name: str) -> list[str] | None:
    """Lines of ``name`` in ``folder`` or its parent (a split folder's dataset root)."""
    for f in (folder / name, folder.parent / name):
        if f.is_file():
            return [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    return None


def prompts(spec: str | Path, split: str = "test") -> tuple[list[str] | None, list[str] | None]:
    """The class names and prompt templates a source carries for zero-shot evaluation:
    the digits' own, or a shard folder's ``classnames.txt`` / ``zeroshot_classification_templates.txt``."""
    if is_digits(spec):
        return list(DIGIT_CLASSNAMES), list(DIGIT_TEMPLATES)
    shards = find_shards(spec, split)
    if shards is None:
        return None, None
    return metadata(shards[1], "classnames.txt"), metadata(shards[1], "zeroshot_classification_templates.txt")

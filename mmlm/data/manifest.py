"""Reading table manifests: CSV, TSV and JSONL, one record per row."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence


def manifest_format(path: str | Path) -> str:
    """'csv', 'tsv' or 'jsonl' from the file name."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".tsv", ".tab"):
        return "tsv"
    if suffix == ".csv":
        return "csv"
    raise ValueError(f"cannot tell the manifest format of {path}: use .csv, .tsv or .jsonl")


def read_manifest(path: str | Path, separator: str | None = None) -> list[dict[str, Any]]:
    """All rows of a CSV / TSV / JSONL manifest as dicts.

    Text is decoded with ``errors="replace"`` so that one row with broken bytes
    does not make the whole file unreadable; ``check_text`` then skips that row.
    """
    path = Path(path)
    fmt = manifest_format(path)
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:  # -sig: drop a BOM
        if fmt == "jsonl":
            rows = []
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            return rows
        sep = separator or ("\t" if fmt == "tsv" else ",")
        return list(csv.DictReader(f, delimiter=sep))


def require_columns(rows: list[dict[str, Any]], columns: list[str], path: str | Path) -> None:
    """Fail at construction, not in a worker, when the manifest lacks a column."""
    if not rows:
        raise ValueError(f"manifest {path} has no rows")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise ValueError(f"manifest {path} has no column(s) {missing}; it has {sorted(rows[0])}")


def label_indices(raw: Sequence[Any], classes: Sequence[str] | None = None) -> tuple[list[str], list[int | None]]:
    """Class names and each raw label's index (None when unknown or missing).

    Default classes: integer labels 0..max as given, else the sorted distinct names.
    """
    if classes is None:
        names = sorted({str(v) for v in raw if isinstance(v, (str, int)) and not isinstance(v, bool) and str(v) != ""})
        if names and all(n.lstrip("-").isdigit() for n in names):
            names = [str(i) for i in range(max(int(n) for n in names) + 1)]
        classes = names
    lookup = {c: i for i, c in enumerate(classes)}
    return list(classes), [lookup.get(str(v)) if v is not None else None for v in raw]

"""An index folder, as ``mmlm index build`` writes it and ``Index.open`` reads it::

    DIR/
      CURRENT            the name of the version folder that is the index (``v000002``), nothing else
      .mmlm-output.json  the marker: DIR is an mmlm index, and the files mmlm wrote in it (``mmlm.outputs``)
      v000002/           the current version: every file a reader needs, complete before CURRENT names it
        manifest.json      model spec and weights hash, embedding dim / dtype / normalisation, counts, skip
                           counts per reason, each build's data and options, library versions
        image_embeds.npy   (items, dim) float32 or float16, L2-normalised; row = id (memory-mappable)
        text_embeds.npy    (texts, dim) the captions' embeddings, grouped by item
        text_ids.npy       (texts,) int64: the id of each caption's item
        image.index        FAISS, inner product; FAISS ids = item ids (plain ``faiss.read_index`` loads it)
        text.index         FAISS over the captions; FAISS ids = their items' ids
        metadata.sqlite    ``items``: one row per id with every metadata column (the caption column holds
                           the item's first caption); ``texts``: one row per caption (row, id, caption)
      v000001/           the previous version, kept for a reader that opened it before the last swap

``mmlm index add`` (and ``build --overwrite``) writes a new version folder beside the current one and
then replaces CURRENT atomically (``mmlm.retrieval.versions``), so DIR always holds one complete index.
Indexes written before versions existed hold the files of one version directly in DIR (the flat layout);
``Index.open`` reads them as they are, and the first ``index add`` turns them into a version folder.

An id is one image. Ids run 0, 1, ... in the order of the data (its manifest rows, sorted file
names, shard order), whatever the number of processes, and ``mmlm index add`` continues them.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from mmlm.retrieval.choose import is_lossy

FORMAT = "mmlm-index/1"
MANIFEST = "manifest.json"
METADATA = "metadata.sqlite"
MODALITIES = ("image", "text")
EMBEDDINGS = {"image": "image_embeds.npy", "text": "text_embeds.npy"}
TEXT_IDS = "text_ids.npy"
INDEXES = {"image": "image.index", "text": "text.index"}
CURRENT = "CURRENT"  # DIR/CURRENT holds the name of the version folder that is the index
VERSION = re.compile(r"v(\d{6})")  # the names of version folders: v000001, v000002, ...
EXACT_SELECTION = 20_000  # a filter selecting at most this many items is searched exactly, from the stored rows
RERANK = 10  # a lossy index (PQ, SQ) proposes RERANK * k items, rescored with the stored embeddings


def read_faiss(path: Path, ondisk: bool = False) -> faiss.Index:
    """A FAISS index file opened read-only and memory-mapped. ``ondisk``: its inverted lists are in the
    ``.ivfdata`` file beside it (``mmlm.retrieval.ondisk``), mapped now; FAISS's own way to find them there
    (``IO_FLAG_ONDISK_SAME_DIR``) prints a line on stdout at every open, so the path is set here instead."""
    if not ondisk:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    index = faiss.read_index(str(path), faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        raise ValueError(f"{path}: the manifest says its lists are on disk, but they are {type(lists).__name__}")
    lists.filename = str(path.with_suffix(".ivfdata"))
    lists.do_mmap()  # the lists stay readable through this map after the version's files are removed
    return index


def version_name(number: int) -> str:
    return f"v{number:06d}"


def versions(folder: Path) -> dict[int, Path]:
    """The version folders in ``folder`` by number (complete or not: CURRENT says which one is the index)."""
    found = (VERSION.fullmatch(p.name) for p in folder.iterdir()) if folder.is_dir() else ()
    return {int(m.group(1)): folder / m.group(0) for m in found if m is not None and (folder / m.group(0)).is_dir()}


def current_version(folder: Path) -> str | None:
    """The name CURRENT holds, or None for an index in the flat layout (no CURRENT)."""
    try:
        name = (folder / CURRENT).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):  # no pointer, or no folder: the caller says what is missing
        return None
    if not VERSION.fullmatch(name):
        raise ValueError(f"{folder / CURRENT} holds {name[:40]!r}, not a version folder's name: not an mmlm index")
    return name


def files_of(folder: str | Path) -> Path:
    """The folder holding the index's files: the one CURRENT names, or ``folder`` itself (flat layout)."""
    folder = Path(folder)
    name = current_version(folder)
    return folder if name is None else folder / name


MANIFEST_KEYS = ("model", "embedding", "counts", "indexes", "skipped", "builds", "versions")  # what every reader uses


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of the index in ``folder`` (its current version), checked to be one."""
    path = files_of(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not an mmlm index folder (no {MANIFEST}); `mmlm index build` writes one")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): not an mmlm index manifest") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path}: format {found!r}, not {FORMAT!r}")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise ValueError(f"{path} is not a complete index manifest (no {', '.join(missing)}); rebuild the index")
    return manifest


class Index:
    """An index folder opened read-only: embeddings memory-mapped, FAISS indexes memory-mapped where
    FAISS can, metadata in SQLite. ``search`` takes query embeddings, ``metadata`` the ids it returned.

    It holds the version that was current when it was opened (``files``), every file of it opened at
    once, so it keeps answering from that version after an ``index add`` swaps in the next one and even
    after the version's files are removed; ``Index.open`` again sees the new one. Close it (or use it in
    a ``with`` block) to let the files go.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any], files: Path | None = None) -> None:
        self.folder, self.manifest = folder, manifest  # folder: DIR, as the user named it
        self.files = files if files is not None else folder  # the version folder read
        self.text_ids: np.ndarray = np.load(self.files / TEXT_IDS, mmap_mode="r")
        self._embeddings = {m: np.load(self.files / EMBEDDINGS[m], mmap_mode="r") for m in MODALITIES}
        uri = (self.files / METADATA).resolve().as_uri() + "?mode=ro"
        self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self.closed = False
        try:
            self._db.execute("SELECT 1 FROM items LIMIT 1").fetchall()  # the file opened now, not at the first query
            # read now as well: a version removed after a later swap stays readable through these maps
            self._indexes: dict[str, faiss.Index] = {
                modality: read_faiss(self.files / entry["file"], bool(entry.get("ondisk")))
                for modality, entry in manifest["indexes"].items()
            }
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def open(cls, folder: str | Path) -> Index:
        """The index in ``folder``: its current version (or its files, in the flat layout)."""
        folder = Path(folder)
        for attempt in range(3):
            files = files_of(folder)
            try:
                return cls(folder, read_manifest(files), files)
            except FileNotFoundError:
                # an add swapped CURRENT and removed what this open had started to read: read CURRENT again
                if attempt == 2 or files_of(folder) == files:
                    raise
        raise AssertionError("unreachable")

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self.manifest["counts"]["items"])

    def __repr__(self) -> str:
        return f"Index({str(self.folder)!r}: {len(self)} items, {len(self.text_ids)} texts)"

    @property
    def dim(self) -> int:
        return int(self.manifest["embedding"]["dim"])

    def embeddings(self, modality: str = "image") -> np.ndarray:
        """The stored embeddings (memory-mapped): image rows are ids, text rows belong to ``text_ids``."""
        _check_modality(modality)
        return self._embeddings[modality]

    def faiss(self, modality: str = "image") -> faiss.Index:
        """The FAISS index of ``modality`` (memory-mapped)."""
        _check_modality(modality)
        if modality not in self._indexes:
            raise ValueError(f"{self.folder} has no {modality} index (its data had no {modality}s)")
        return self._indexes[modality]

    def select(self, where: dict[str, Any] | None) -> np.ndarray:
        """The ids of the items whose metadata match ``where`` (sorted int64), for ``search(ids=...)``.

        ``where`` maps a column of the ``items`` table to a condition; all of them must hold:

        - a value: equality (``{"year": 2024}``, ``{"label": "cat"}``; ``None``: the column is empty),
        - ``{"gt" | "gte" | "lt" | "lte": value, ...}``: a range (the bounds together),
        - ``{"in": [values]}``: any of the values,
        - ``{"prefix": "2024/"}``: text that starts with it (``{"filepath": {"prefix": "2024/"}}``).

        A number compares with numbers and with text that reads as one: a CSV manifest's columns hold
        text, so ``{"year": {"gte": 2020}}`` must match ``"2021"``. A ValueError names an unknown column
        or a malformed condition. Values are bound as SQL parameters; column names are checked against
        the table's, then quoted.
        """
        if not where:
            return np.arange(len(self), dtype=np.int64)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(items)")}
        clauses, params = where_sql(where, columns)
        rows = self._db.execute(f"SELECT id FROM items WHERE {' AND '.join(clauses)} ORDER BY id", params)
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    def search(
        self, vectors: Any, k: int = 10, modality: str = "image", rerank: int | None = None, ids: Any = None,
        min_score: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """The ``k`` items whose ``modality`` embedding is nearest each query: (ids, scores), both (Q, k).

        Queries ((Q, dim) or (dim,), numpy or torch) are L2-normalised, so scores are cosine
        similarities. An item matched by several of its captions counts once, at its best score.
        A lossy index (PQ, SQ) proposes ``rerank * k`` items (default: the depth the build tuned for this index,
        else ``RERANK``), rescored with the stored embeddings
        (memory-mapped: only their rows are read). Where fewer than ``k`` items exist, rows end in
        id -1 and score -inf (FAISS's padding).

        ``ids`` (``select(where)``): only these items are searched. The selection goes into FAISS
        (an ``IDSelectorBatch`` in its search parameters), so the ``k`` best *matching* items come back
        whenever ``k`` match, not what is left of the ``k`` best after a filter. A narrow selection (at most
        ``EXACT_SELECTION`` items) is scored exactly from the stored embeddings instead, reading only its
        rows; so is any query that FAISS answered with fewer than ``k`` matching hits (an IVF index probes
        only its ``nprobe`` nearest lists, which a narrow filter may leave nearly empty): a filtered search
        returns ``min(k, matching items)`` hits on every index type. ``min_score``: hits below it become
        -1 / -inf.
        """
        if rerank is None:
            rerank = int(self.manifest["indexes"].get(modality, {}).get("rerank") or RERANK)
        if k < 1 or rerank < 1:
            raise ValueError(f"k={k}, rerank={rerank}: give numbers >= 1")
        queries = np.array(vectors.detach().cpu().numpy() if hasattr(vectors, "detach") else vectors, dtype=np.float32)
        queries = np.ascontiguousarray(queries.reshape(-1, queries.shape[-1]))
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries of dim {queries.shape[1]}, but {self.folder} holds {self.dim}-d embeddings")
        faiss.normalize_L2(queries)
        index = self.faiss(modality)
        factor = rerank if is_lossy(index) else 1
        per_item = 1 if modality == "image" else max(1, int(self.manifest["counts"]["max_texts_per_item"]))
        wanted = max(k, min(k * factor * per_item, index.ntotal))
        if ids is None:
            scores, found = index.search(queries, wanted)
        else:
            selected = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
            selected = selected[(selected >= 0) & (selected < len(self))]
            if len(selected) <= EXACT_SELECTION:
                return _above(*self._exact_search(queries, selected, k, modality), min_score)
            # text: FAISS ids are the items' ids (one per caption), so the same item ids select captions
            selector = faiss.IDSelectorBatch(selected)
            params = search_parameters(index, selector)
            scores, found = index.search(queries, wanted, params=params)
            del params, selector  # (FAISS keeps raw pointers: both lived until the search ended)
            short = np.array([len(np.unique(row[row >= 0])) < k for row in found])
            if short.any():  # the probed lists held fewer than k of the selection: exact for those queries
                exact_ids, exact_scores = self._exact_search(queries[short], selected, wanted, modality)
                found[short], scores[short] = exact_ids, exact_scores
        if factor > 1:
            scores = self._exact_scores(queries, found, modality)
            order = np.argsort(-scores, axis=1, kind="stable")
            found, scores = np.take_along_axis(found, order, 1), np.take_along_axis(scores, order, 1)
        return _above(*_first_per_id(found, scores, k), min_score)

    def _exact_search(self, queries: np.ndarray, selected: np.ndarray, k: int, modality: str,
                      chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """The ``k`` best of the ``selected`` items (sorted ids) for each query, scored from the stored
        embeddings: exact whatever the index type, and reading only the selection's rows (in chunks)."""
        stored = self._embeddings[modality]
        if modality == "image":
            rows, owners = selected, selected
        else:  # every caption of the selected items; an item scores as its best caption
            rows = np.flatnonzero(np.isin(self.text_ids, selected))
            owners = np.asarray(self.text_ids)[rows]
        best_ids = np.full((len(queries), 0), -1, np.int64)
        best_scores = np.full((len(queries), 0), -np.inf, np.float32)
        for start in range(0, len(rows), chunk):  # keep each chunk's best alongside the best so far
            part = np.asarray(stored[rows[start : start + chunk]], dtype=np.float32)
            scores = np.concatenate([best_scores, queries @ part.T], axis=1)
            owner = np.concatenate([best_ids, np.broadcast_to(owners[start : start + chunk], (len(queries), len(part)))], 1)
            order = np.argsort(-scores, axis=1, kind="stable")
            best_ids, best_scores = _first_per_id(np.take_along_axis(owner, order, 1),
                                                  np.take_along_axis(scores, order, 1), k)  # fmt: skip
        return _first_per_id(best_ids, best_scores, k)

    def _exact_scores(self, queries: np.ndarray, ids: np.ndarray, modality: str) -> np.ndarray:
        """Each candidate's cosine similarity from the stored embeddings (an item's best caption for text)."""
        stored = self._embeddings[modality]
        out = np.full(ids.shape, -np.inf, dtype=np.float32)
        for row, (query, row_ids) in enumerate(zip(queries, ids)):
            found = np.flatnonzero(row_ids >= 0)
            if modality == "image":
                out[row, found] = np.asarray(stored[row_ids[found]], dtype=np.float32) @ query
                continue
            first = np.searchsorted(self.text_ids, row_ids[found], "left")
            last = np.searchsorted(self.text_ids, row_ids[found], "right")
            for j, a, b in zip(found, first, last):
                out[row, j] = (np.asarray(stored[a:b], dtype=np.float32) @ query).max()
        return out

    def metadata(self, ids: Any) -> list[dict[str, Any] | None]:
        """The metadata row of each id (None for -1 or an unknown id), with ``captions``: all of the item's."""
        wanted = [int(i) for i in np.asarray(ids).reshape(-1)]
        known = sorted({i for i in wanted if i >= 0})
        rows: dict[int, dict[str, Any]] = {}
        for start in range(0, len(known), 900):  # SQLite's limit on bound parameters
            part = known[start : start + 900]
            marks = ",".join("?" * len(part))
            for row in self._db.execute(f"SELECT * FROM items WHERE id IN ({marks})", part):
                rows[row["id"]] = {k: v for k, v in zip(row.keys(), row) if v is not None}
            texts = self._db.execute(f"SELECT id, caption FROM texts WHERE id IN ({marks}) ORDER BY row", part)
            for i, caption in texts:
                rows[i].setdefault("captions", []).append(caption)
        return [rows.get(i) for i in wanted]

    def close(self) -> None:
        """Let the files go (the SQLite connection, the memory maps); closing twice is harmless."""
        if self.closed:
            return
        self.closed = True
        self._db.close()
        self._indexes.clear()
        self._embeddings.clear()


RANGES = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}  # a where condition's range operators in SQL
MAX_VALUES = 1000  # values of one where (``in`` lists included): SQL parameters, bounded


def where_sql(where: dict[str, Any], columns: set[str]) -> tuple[list[str], list[Any]]:
    """``Index.select``'s ``where`` as SQL clauses (ANDed) and their parameters; ValueError if malformed."""
    if not isinstance(where, dict):
        raise ValueError(f"where: give an object of column: condition, not {type(where).__name__}")
    clauses: list[str] = []
    params: list[Any] = []
    for column, condition in where.items():
        if column not in columns:
            raise ValueError(f"where: no column {str(column)[:100]!r}; the items have {', '.join(sorted(columns))}")
        name = '"' + column.replace('"', '""') + '"'
        if not isinstance(condition, dict):
            condition = {"eq": condition}
        if not condition:
            raise ValueError(f"where: {column!r}: an empty condition")
        for op, value in condition.items():
            clause, values = _condition(name, column, op, value)
            clauses.append(clause)
            params += values
    if len(params) > MAX_VALUES:
        raise ValueError(f"where: {len(params)} values; the limit is {MAX_VALUES}")
    return clauses, params


def _condition(name: str, column: str, op: str, value: Any) -> tuple[str, list[Any]]:
    """One condition on one column: (SQL, parameters)."""
    # text that reads as a number compares as one (a CSV's columns are text); other text does not compare
    number = (f"(CASE WHEN typeof({name}) IN ('integer', 'real') THEN {name} WHEN typeof({name}) = 'text' "
              f"AND trim({name}) <> '' AND trim({name}) NOT GLOB '*[^0-9.eE+-]*' THEN CAST({name} AS REAL) END)")  # fmt: skip
    if op == "eq":
        if value is None:
            return f"{name} IS NULL", []
        value = _scalar(column, op, value)
        return (f"{number} = ?" if not isinstance(value, str) else f"{name} = ?"), [value]
    if op in RANGES:
        value = _scalar(column, op, value)
        if isinstance(value, str):  # text ranges (dates as ISO text) compare text only
            return f"(typeof({name}) = 'text' AND {name} {RANGES[op]} ?)", [value]
        return f"{number} {RANGES[op]} ?", [value]
    if op == "in":
        if not isinstance(value, list) or not value:
            raise ValueError(f"where: {column!r}: 'in' takes a non-empty list of values")
        values = [_scalar(column, op, v) for v in value]
        texts, numbers = [v for v in values if isinstance(v, str)], [v for v in values if not isinstance(v, str)]
        parts = [f"{name} IN ({','.join('?' * len(texts))})"] if texts else []
        parts += [f"{number} IN ({','.join('?' * len(numbers))})"] if numbers else []
        return "(" + " OR ".join(parts) + ")", texts + numbers
    if op == "prefix":
        if not isinstance(value, str) or not value:
            raise ValueError(f"where: {column!r}: 'prefix' takes a non-empty text")
        # substr, not LIKE: a prefix holding % or _ means itself
        return f"(typeof({name}) = 'text' AND substr({name}, 1, ?) = ?)", [len(value), value]
    raise ValueError(f"where: {column!r}: unknown operator {str(op)[:40]!r}; use gt, gte, lt, lte, in, prefix "
                     "or a value")  # fmt: skip


def _scalar(column: str, op: str, value: Any) -> str | int | float:
    if isinstance(value, bool):  # JSON true / false: stored as 1 / 0
        return int(value)
    if isinstance(value, str) or (isinstance(value, (int, float)) and math.isfinite(value)):
        return value
    raise ValueError(f"where: {column!r} {op}: give a text or a finite number, not {str(value)[:40]!r}")


def search_parameters(index: faiss.Index, selector: faiss.IDSelector) -> faiss.SearchParameters:
    """FAISS search parameters that restrict ``index``'s search to ``selector``, the index's own settings kept
    (an IVF index's ``nprobe``, HNSW's ``efSearch``: parameters replace them, defaults included)."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexIDMap):  # it translates the selector into its inner index's row numbers
        inner = faiss.downcast_index(inner.index)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        if not isinstance(faiss.downcast_index(index), faiss.IndexIVF):  # e.g. OPQ or PCA before the IVF
            raise ValueError(f"where: filtered search of a {type(faiss.downcast_index(index)).__name__} index is not "
                             "supported; rebuild it with an IVF or Flat --index_type")  # fmt: skip
        return faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe, max_codes=ivf.max_codes)
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=inner.hnsw.efSearch)
    return faiss.SearchParameters(sel=selector)


def _above(ids: np.ndarray, scores: np.ndarray, min_score: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Hits scored below ``min_score`` become -1 / -inf (scores are sorted: what goes is each row's tail)."""
    if min_score is not None:
        below = scores < min_score
        ids[below], scores[below] = -1, -np.inf
    return ids, scores


def _first_per_id(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first ``k`` distinct ids (FAISS returns best first), padded with -1 / -inf."""
    out_ids = np.full((len(ids), k), -1, dtype=np.int64)
    out_scores = np.full((len(ids), k), -np.inf, dtype=np.float32)
    for row, (row_ids, row_scores) in enumerate(zip(ids, scores)):
        _, first = np.unique(row_ids, return_index=True)
        first = np.sort(first[row_ids[first] >= 0])[:k]
        out_ids[row, : len(first)] = row_ids[first]
        out_scores[row, : len(first)] = row_scores[first]
    return out_ids, out_scores


def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, not {modality!r}")


def describe(manifest: dict[str, Any], folder: str | Path = "") -> str:
    """The manifest in words (``mmlm index info``)."""
    model, emb, counts = manifest["model"], manifest["embedding"], manifest["counts"]
    normalised = "L2-normalised, " if emb["normalized"] else ""
    int8 = ", embedded in int8" if model.get("int8") else ""
    lines = [
        f"{folder or 'index'}: {counts['items']:,} images, {counts['texts']:,} captions",
        f"  model      {model['spec']} ({model['type']}, weights hash {model['weights_hash'][:12]}{int8})",
        f"  embeddings {emb['dim']}-d {emb['dtype']}, {normalised}{emb['metric'].replace('_', ' ')}",
    ]
    for modality, entry in manifest["indexes"].items():
        probe = f", nprobe {entry['nprobe']}" if entry.get("nprobe") else ""
        ondisk = f" + {entry['ondisk']} on disk" if entry.get("ondisk") else ""
        lines.append(f"  {modality:10s} FAISS {entry['type']}, {entry['ntotal']:,} vectors{probe} "
                     f"({entry['file']}{ondisk})")  # fmt: skip
        if entry.get("choice"):
            choice = entry["choice"]
            trained = f"; trained on {choice['train_vectors']:,} vectors" if choice.get("train_vectors") else ""
            cap = f" (--max_train_memory {choice['max_train_memory']})" if choice.get("max_train_memory") else ""
            lines.append(f"  {'':10s} chosen: {choice['reason']}{trained}{cap}")
        if entry.get("tuning"):
            t = entry["tuning"]
            lines.append(
                f"  {'':10s} nprobe tuned: recall@10 {t['recall@10']:.3f} after re-ranking "
                f"{t.get('rerank', RERANK)} x k candidates, "
                f"{t['query_ms']:.2f} ms a query (target {t['target_ms']} ms, {t['queries']} queries)"
            )
    skipped = manifest["skipped"]
    lines.append(f"  skipped    {sum(skipped.values())}" + (f" ({', '.join(f'{k} {v}' for k, v in skipped.items())})"
                                                            if skipped else ""))  # fmt: skip
    for build in manifest["builds"]:
        ids = f"ids {build['ids'][0]}-{build['ids'][1]}" if build["ids"] else "no ids"
        what = f"{build['items']:,} images, {build['texts']:,} captions, {ids}"
        lines.append(f"  {build['command']:10s} {build['data']}: {what}, {sum(build['skipped'].values())} skipped, "
                     f"{build['seconds']} s, {build['finished']}")  # fmt: skip
    for sync in manifest.get("syncs", [])[-1:]:  # the last one: a folder synced every minute has thousands
        counts = ", ".join(f"{sync['counts'][k]} {k}" for k in ("added", "changed", "removed", "renamed", "embedded"))
        lines.append(f"  synced     {len(manifest['syncs'])}x, last: {counts}, {sync['seconds']} s, {sync['finished']}")
    versions = ", ".join(f"{k} {v}" for k, v in manifest["versions"].items())
    lines.append(f"  versions   {versions}")
    return "\n".join(lines)

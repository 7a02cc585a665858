"""`mmlm index`: what the folder holds, checked against the model's own embeddings, brute-force numpy
search, plain FAISS in a process without mmlm, and the manifests the data came from."""

from __future__ import annotations

import csv
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import mmlm
from mmlm.cli import main
from mmlm.data import image_transform
from mmlm.data.digits import digits_image_text
from mmlm.factory import load
from mmlm.paths import ASSETS
from mmlm.retrieval import Index, add_to_index, build_index
from mmlm.retrieval.choose import train_size
from mmlm.retrieval.index import describe
from mmlm.retrieval.options import parse_size

CPU = {"accelerator": "cpu"}


pytestmark = pytest.mark.usefixtures("one_thread")


PLAIN_FAISS = """
import json, faiss, numpy as np
out = {}
for modality in ("image", "text"):
    index = faiss.read_index(f"{modality}.index")
    queries = np.load(f"{modality}_embeds.npy").astype("float32")
    scores, ids = index.search(queries, 3)
    out[modality] = {"ntotal": index.ntotal, "type": type(faiss.downcast_index(index)).__name__,
                     "ids": ids.tolist(), "scores": scores.tolist()}
print(json.dumps(out))
"""


def error_line(capsys, *args: str) -> str:
    """The command fails with exit code 2 and one line ``mmlm index ...: error: ...``, no traceback."""
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"mmlm index {args[1]}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _manifest_items() -> dict[str, list[str]]:
    with open(ASSETS / "captions.csv", newline="") as f:
        items: dict[str, list[str]] = {}
        for row in csv.DictReader(f):
            items.setdefault(row["filepath"], []).append(row["title"])
    return items


# ------------------------------------------------------------------------------ the bundled photographs


def test_bundled_photos_are_their_own_nearest_image(assets_index):
    items = _manifest_items()
    model = load("clip-tiny", seed=0).model
    transform = image_transform(model.cfg.vision, train=False)
    with torch.no_grad():
        own = model.encode_image(torch.stack([transform(Image.open(ASSETS / p).convert("RGB")) for p in items]))
    stored = assets_index.embeddings("image")
    assert stored.shape == (len(items), 32) and stored.dtype == np.float32
    np.testing.assert_allclose(stored, own.numpy(), atol=1e-6)  # row = id, in manifest order
    ids, scores = assets_index.search(own, k=2)  # queries: the model's own embeddings of the photos
    assert ids[:, 0].tolist() == list(range(len(items)))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (scores[:, 1] < scores[:, 0] - 1e-4).all()  # a different photo is never a tie
    manifest = json.loads((assets_index.files / "manifest.json").read_text())
    assert manifest["counts"] == {"items": 21, "texts": 49, "max_texts_per_item": 3}
    assert manifest["skipped"] == {} and manifest["embedding"]["normalized"] is True
    assert manifest["builds"][0]["data"] == "assets" and manifest["model"]["spec"] == "clip-tiny"


def test_metadata_holds_every_manifest_column_and_caption(assets_index):
    items = _manifest_items()
    rows = assets_index.metadata(range(len(items)))
    assert [r["filepath"] for r in rows] == list(items)
    assert [r["captions"] for r in rows] == list(items.values())
    assert all(r["title"] == caps[0] for r, caps in zip(rows, items.values()))
    assert assets_index.metadata([-1, 999]) == [None, None]
    with sqlite3.connect(assets_index.files / "metadata.sqlite") as db:  # plain SQLite reads it too
        assert db.execute("SELECT COUNT(*) FROM items").fetchone() == (21,)
        texts = db.execute("SELECT id, caption FROM texts ORDER BY row").fetchall()
    assert texts == [(i, c) for i, caps in enumerate(items.values()) for c in caps]
    np.testing.assert_array_equal(assets_index.text_ids, [i for i, _ in texts])


def test_plain_faiss_loads_the_files(assets_index, run_client, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(assets_index.files, folder)  # the current version's files: a plain folder FAISS reads
    out = run_client(PLAIN_FAISS, cwd=folder)
    assert out["image"]["ntotal"] == 21 and out["text"]["ntotal"] == 49
    assert out["image"]["type"] == out["text"]["type"] == "IndexIDMap"
    for modality in ("image", "text"):  # FAISS's exact top 3 = numpy's, and its ids are item ids
        vectors = np.load(folder / f"{modality}_embeds.npy")
        item = np.arange(21) if modality == "image" else np.load(folder / "text_ids.npy")
        best = np.argsort(-(vectors @ vectors.T), axis=1, kind="stable")[:, :3]
        np.testing.assert_allclose(out[modality]["scores"], np.take_along_axis(vectors @ vectors.T, best, 1), atol=1e-5)
        assert np.array_equal(np.asarray(out[modality]["ids"])[:, 0], item[best[:, 0]])


def test_text_search_counts_an_item_once_at_its_best_caption(assets_index):
    texts, owner = assets_index.embeddings("text"), assets_index.text_ids
    queries = assets_index.embeddings("image")[:5]
    ids, scores = assets_index.search(queries, k=4, modality="text")
    per_caption = queries @ texts.T
    best = np.full((5, 21), -np.inf)
    np.maximum.at(best, (np.arange(5)[:, None], np.broadcast_to(owner, per_caption.shape)), per_caption)
    order = np.argsort(-best, axis=1, kind="stable")[:, :4]
    assert ids.tolist() == order.tolist()
    np.testing.assert_allclose(scores, np.take_along_axis(best, order, 1), atol=1e-5)


def test_info_prints_the_manifest_in_words(assets_index, capsys):
    main(["index", "info", str(assets_index.folder)])
    out = capsys.readouterr().out
    assert "21 images, 49 captions" in out and "clip-tiny (CLIP, weights hash" in out
    assert "image      FAISS Flat, 21 vectors" in out and "faiss 1.15" in out


# ------------------------------------------------------------------------------ other kinds of DATA


GOOD = {"coffee.jpg": ["a cup of espresso", "a red saucer with a spoon"], "chelsea.jpg": ["a tabby cat"],
        "camera.jpg": ["a man with a camera on a tripod"]}  # fmt: skip
EXPECTED = {"corrupt_image": 2, "decompression_bomb": 1, "empty_file": 1, "empty_text": 1, "missing_file": 1,
            "non_text": 1}  # fmt: skip


@pytest.fixture(scope="module")
def bad_manifest(tmp_path_factory) -> Path:
    """Good photos, one bad sample of each kind, and an extra column (``source``)."""
    d = tmp_path_factory.mktemp("bad")
    (d / "img").mkdir()
    for name in GOOD:
        shutil.copy(ASSETS / "images" / name, d / "img" / name)
    (d / "img" / "corrupt.jpg").write_bytes(b"this is not a JPEG at all" * 10)
    real = (ASSETS / "images" / "rocket.jpg").read_bytes()
    (d / "img" / "truncated.jpg").write_bytes(real[: len(real) // 2])
    (d / "img" / "empty.jpg").write_bytes(b"")
    Image.new("1", (10_000, 9_000)).save(d / "img" / "bomb.png")  # 90M pixels: over Pillow's limit
    rows = [(f"img/{n}", c) for n, caps in GOOD.items() for c in caps] + [
        ("img/missing.jpg", "not there"), ("img/corrupt.jpg", "garbage"), ("img/truncated.jpg", "half a rocket"),
        ("img/empty.jpg", "zero bytes"), ("img/bomb.png", "too many pixels"), ("img/chelsea.jpg", "   "),
    ]  # fmt: skip
    lines = ["filepath,caption,source"] + [f"{p},{c},web{i}" for i, (p, c) in enumerate(rows)]
    data = ("\n".join(lines) + "\n").encode() + b"img/coffee.jpg,\xff\xfe broken \xff bytes,web99\n"
    (d / "manifest.csv").write_bytes(data)
    return d / "manifest.csv"


def test_one_bad_sample_of_each_kind_indexes_exactly_the_good_ones(bad_manifest, tmp_path):
    index = build_index("clip-tiny", str(bad_manifest), tmp_path / "ix", batch_size=4, num_workers=2, **CPU)
    manifest = index.manifest
    assert manifest["skipped"] == EXPECTED and manifest["builds"][0]["skipped"] == EXPECTED
    assert manifest["counts"]["items"] == 3 and manifest["counts"]["texts"] == 4
    assert manifest["builds"][0]["data"] == str(bad_manifest.resolve())  # found again from any folder
    assert index.faiss("image").ntotal == 3 and index.faiss("text").ntotal == 4
    rows = index.metadata([0, 1, 2])
    assert [r["filepath"] for r in rows] == [f"img/{n}" for n in GOOD]
    assert [r["captions"] for r in rows] == list(GOOD.values())
    assert [r["source"] for r in rows] == ["web0", "web2", "web3"]  # each image's first row


def test_a_folder_of_photos_without_captions(tmp_path):
    folder = tmp_path / "photos"
    (folder / "cats").mkdir(parents=True)
    for name in ("rocket.jpg", "coffee.jpg"):
        shutil.copy(ASSETS / "images" / name, folder / name)
    shutil.copy(ASSETS / "images" / "chelsea.jpg", folder / "cats" / "chelsea.jpg")
    (folder / "notes.txt").write_text("not an image, not read")
    (folder / "cats" / "broken.png").write_bytes(b"\x89PNG not really")
    index = build_index("clip-tiny", str(folder), tmp_path / "ix", **CPU)
    assert [r["filepath"] for r in index.metadata(range(3))] == ["cats/chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    assert index.manifest["skipped"] == {"corrupt_image": 1} and list(index.manifest["indexes"]) == ["image"]
    assert len(index.text_ids) == 0 and index.embeddings("text").shape == (0, 32)
    assert index.search(index.embeddings("image"), k=1)[0][:, 0].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="has no text index"):
        index.search(index.embeddings("image"), modality="text")


def test_webdataset_shards_keep_their_keys_and_json_fields(tmp_path):
    digits = digits_image_text("test")
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"{shard}.tar")) as sink:
            for i in range(shard * 5, shard * 5 + 5):
                sample = {"__key__": f"d{i:03d}", "png": digits.image(i),
                          "json": {"caption": digits.captions[i], "label": int(digits.labels[i])}}  # fmt: skip
                if i == 7:
                    del sample["png"]  # no image
                sink.write(sample)
    index = build_index("clip-tiny", str(tmp_path / "{0..1}.tar"), tmp_path / "ix", batch_size=3, num_workers=2, **CPU)
    rows = index.metadata(range(9))
    assert [r["key"] for r in rows] == [f"d{i:03d}" for i in range(10) if i != 7]  # shard order, not worker order
    assert [r["label"] for r in rows] == [int(digits.labels[i]) for i in range(10) if i != 7]
    assert [r["caption"] for r in rows] == [digits.captions[i] for i in range(10) if i != 7]
    assert index.manifest["skipped"] == {"missing_field": 1}


def test_the_training_sample_fits_the_train_memory():
    """100 vectors per cluster (at least 10,000), cut to what ``--max_train_memory`` holds in float32, never
    under 39 per cluster (FAISS's least): a smaller budget is refused naming it."""
    assert train_size(1_000_000, 512, 1024) == 102_400
    assert train_size(1_000_000, 512, 16) == 10_000 and train_size(5_000, 512, 8) == 5_000
    assert train_size(1_000_000, 512, 1024, parse_size("100M")) == 51_200  # 100 MiB / 2 KiB a vector
    assert train_size(1_000_000, 512, 1024, parse_size("1G")) == 102_400  # room to spare: the default
    with pytest.raises(ValueError, match=r"--max_train_memory 1 MiB: training 1,024 clusters takes at least "
                                         r"39,936 512-d vectors \(78 MiB\)"):  # fmt: skip
        train_size(1_000_000, 512, 1024, parse_size("1M"))


def test_a_capped_training_sample_is_recorded(tmp_path):
    index = build_index("clip-tiny", "digits", tmp_path / "ix", index_type="IVF4,Flat", nprobe=4,
                        max_train_memory="24K", **CPU)  # fmt: skip
    choice = index.manifest["indexes"]["image"]["choice"]
    assert choice["train_vectors"] == 24 * 1024 // (4 * index.dim) == 192  # of 360: cut to the budget
    assert choice["max_train_memory"] == "24K"
    assert f"trained on {choice['train_vectors']:,} vectors (--max_train_memory 24K)" in describe(
        index.manifest, index.files)


@pytest.mark.parametrize("index_type", ["IVF8,Flat", pytest.param("IVF4,PQ16", marks=pytest.mark.slow)])  # PQ: 2 s
def test_ivf_index_types_are_trained_and_searchable(index_type, tmp_path):
    index = build_index("clip-tiny", "digits", tmp_path / "ix", index_type=index_type, nprobe=8, **CPU)
    assert index.manifest["indexes"]["image"] == {
        "file": "image.index", "type": index_type, "ntotal": 360, "nprobe": min(8, int(index_type[3])),
        "ondisk": "image.ivfdata", "choice": {"reason": "given by --index_type", "max_index_memory": None,
                                              "max_train_memory": None, "train_vectors": 360},
    }  # IVF lists on disk beside the index, memory-mapped  # fmt: skip
    assert (index.files / "image.ivfdata").stat().st_size >= 360 * (8 + 4 * index.dim if "Flat" in index_type else 8)
    vectors = index.embeddings("image")
    cosine = vectors @ vectors.T
    exact = np.argsort(-cosine, axis=1, kind="stable")[:, :5]
    ids, scores = index.search(vectors, k=5)  # every cluster probed; PQ candidates rescored exactly
    np.testing.assert_allclose(scores, np.take_along_axis(cosine, ids, 1), atol=1e-5)
    assert (ids[:, 0] == np.arange(360)).all() and np.mean(ids == exact) > 0.99
    if "PQ" in index_type:  # FAISS's own PQ ranking, not reranked, is far off on these crowded embeddings
        raw, _ = index.search(vectors, k=5, rerank=1)
        assert np.mean(raw[:, 0] == np.arange(360)) < 0.9


# ------------------------------------------------------------------------------ add


@pytest.mark.slow
def test_add_continues_the_ids_and_refuses_another_model(bad_manifest, tmp_path, capsys):
    model = mmlm.save(mmlm.create_model("clip-tiny"), tmp_path / "model")
    first = build_index(str(model), "assets", tmp_path / "ix", **CPU)
    before = np.array(first.embeddings("image"))
    main(["index", "add", str(tmp_path / "ix"), str(bad_manifest), "--accelerator", "cpu"])
    grown = Index.open(tmp_path / "ix")
    assert len(grown) == 24 and len(grown.text_ids) == 49 + 4
    np.testing.assert_array_equal(grown.embeddings("image")[:21], before)  # old ids unchanged
    alone = build_index(str(model), str(bad_manifest), tmp_path / "alone", **CPU)
    np.testing.assert_allclose(grown.embeddings("image")[21:], alone.embeddings("image"), atol=1e-6)
    assert [r["filepath"] for r in grown.metadata([20, 21, 23])] == ["images/text.jpg", "img/coffee.jpg",
                                                                      "img/camera.jpg"]  # fmt: skip
    assert grown.faiss("image").ntotal == 24
    ids, scores = grown.search(alone.embeddings("image"), 2)  # the same photos are in the assets: two hits each
    old = [list(_manifest_items()).index(f"images/{n}") for n in GOOD]
    assert [sorted(row) for row in ids.tolist()] == [[i, 21 + j] for j, i in enumerate(old)]
    np.testing.assert_allclose(scores, 1.0, atol=1e-5)
    assert grown.manifest["skipped"] == EXPECTED
    assert [b["command"] for b in grown.manifest["builds"]] == ["build", "add"]
    assert "add        " in capsys.readouterr().out

    mmlm.save(mmlm.create_model("clip-tiny"), model, overwrite=True)  # other weights at the same path
    line = error_line(capsys, "index", "add", str(tmp_path / "ix"), "assets", "--accelerator", "cpu")
    assert f"{model} is not the model" in line and grown.manifest["model"]["weights_hash"][:12] in line
    assert Index.open(tmp_path / "ix").manifest == grown.manifest


def test_int8_build_embeds_with_the_int8_copy_and_add_keeps_it(assets_index, bad_manifest, tmp_path, capsys):
    from mmlm.compress import quantize_int8

    model = load("clip-tiny", seed=0).model
    main(["index", "build", "clip-tiny", "assets", "--out", str(tmp_path / "ix"), "--int8"])
    assert "embedded in int8" in capsys.readouterr().out
    int8 = Index.open(tmp_path / "ix")
    assert int8.manifest["model"]["int8"] is True and assets_index.manifest["model"]["int8"] is False
    # the float model's identity: `index add` and `mmlm serve` find the model by it
    assert int8.manifest["model"]["weights_hash"] == assets_index.manifest["model"]["weights_hash"]
    quantized, transform = quantize_int8(model), image_transform(model.cfg.vision, train=False)
    with torch.no_grad():
        own = quantized.encode_image(torch.stack([transform(Image.open(ASSETS / p).convert("RGB"))
                                                  for p in _manifest_items()]))  # fmt: skip
    stored, fp32 = int8.embeddings("image"), assets_index.embeddings("image")
    np.testing.assert_allclose(stored, own.numpy(), atol=1e-6)
    assert np.abs(stored - fp32).max() > 1e-4  # really the int8 copy, ...
    assert (np.sum(stored * fp32, axis=1) > 0.99).all()  # ... within int8's cosine of the float one

    grown = add_to_index(tmp_path / "ix", str(bad_manifest), accelerator="cpu")  # embedded the way the index was
    with torch.no_grad():
        added = quantized.encode_image(torch.stack([transform(Image.open(ASSETS / "images" / n).convert("RGB"))
                                                    for n in GOOD]))  # fmt: skip
    np.testing.assert_allclose(grown.embeddings("image")[21:], added.numpy(), atol=1e-6)
    assert [b["command"] for b in grown.manifest["builds"]] == ["build", "add"] and grown.manifest["model"]["int8"]


# ------------------------------------------------------------------------------ mistakes


@pytest.mark.slow
def test_mistakes_are_one_line(assets_index, tmp_path, capsys):
    line = error_line(capsys, "index", "build", "clip-tiny", str(tmp_path / "nothing"), "--out", str(tmp_path / "a"))
    assert f"DATA {str(tmp_path / 'nothing')!r}: not 'digits', 'assets'" in line
    line = error_line(capsys, "index", "build", "clip-tiny", "assets", "--out", str(assets_index.folder))
    assert f"{assets_index.folder} already exists" in line and "--overwrite" in line
    build = ["index", "build", "clip-tiny", "assets", "--out", str(tmp_path / "b"), "--index_type"]
    assert "--index_type 'IVF,PQ': not a FAISS index_factory string" in error_line(capsys, *build, "IVF,PQ")
    assert "IVF64,Flat: 21 vectors cannot train 64 clusters" in error_line(capsys, *build, "IVF64,Flat")
    line = error_line(capsys, "index", "build", "clip-tiny", "assets")
    assert "--out DIR" in line
    line = error_line(capsys, "index", "build", "clip-tiny", "assets", "--out", str(tmp_path / "c"), "--int8",
                      "--accelerator", "gpu")  # fmt: skip
    assert "--accelerator gpu: int8 embeds on the CPU" in line
    line = error_line(capsys, "index", "info", str(tmp_path))
    assert "is not an mmlm index folder" in line
    assert not [p for p in tmp_path.iterdir() if p.name != "nothing"]  # nothing written, no partial left

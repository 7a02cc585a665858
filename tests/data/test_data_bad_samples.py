"""One of each kind of bad sample: exactly the good ones come out, and each is counted once."""

import json
import logging
import shutil

import pytest
from PIL import Image

from mmlm.data import (
    ImageClassificationCollator,
    ImageClassificationDataset,
    ImageTextCollator,
    ImageTextDataset,
    ReplaceBad,
    SkippingDataLoader,
    get_tokenizer,
    image_transform,
)

GOOD = {  # image -> captions that are fine
    "coffee.jpg": ["a cup of espresso", "a red saucer with a spoon"],
    "chelsea.jpg": ["a tabby cat"],
    "camera.jpg": ["a man with a camera on a tripod"],  # greyscale JPEG: converted to RGB
}


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory, assets):
    """A folder with good images and one file of each bad kind."""
    d = tmp_path_factory.mktemp("bad")
    (d / "img").mkdir()
    for name in GOOD:
        shutil.copy(assets / "images" / name, d / "img" / name)
    (d / "img" / "corrupt.jpg").write_bytes(b"this is not a JPEG at all" * 10)
    real = (assets / "images" / "rocket.jpg").read_bytes()
    (d / "img" / "truncated.jpg").write_bytes(real[: len(real) // 2])
    (d / "img" / "empty.jpg").write_bytes(b"")
    # 10000 x 9000 = 90M pixels: just over Pillow's MAX_IMAGE_PIXELS (89.5M), a few kB as 1-bit PNG
    Image.new("1", (10_000, 9_000)).save(d / "img" / "bomb.png")
    return d


def _rows():
    rows = [(f"img/{name}", cap) for name, caps in GOOD.items() for cap in caps]
    rows += [
        ("img/missing.jpg", "a photo that is not there"),
        ("img/corrupt.jpg", "garbage bytes"),
        ("img/truncated.jpg", "half a rocket"),
        ("img/empty.jpg", "zero bytes"),
        ("img/bomb.png", "far too many pixels"),
        ("img/chelsea.jpg", "   "),  # empty caption of a good image
    ]
    return rows


EXPECTED = {
    "missing_file": 1, "corrupt_image": 2, "empty_file": 1, "decompression_bomb": 1, "empty_text": 1, "non_text": 1,
}  # fmt: skip


def _loader(manifest, num_workers=2):
    ds = ImageTextDataset(manifest, transform=image_transform("clip-tiny", train=False))
    collate = ImageTextCollator(get_tokenizer("clip"), context_length=32)
    return ds, SkippingDataLoader(ds, batch_size=4, num_workers=num_workers, collate_fn=collate)


def _run(loader):
    captions, image_ids = [], []
    tok = loader.collate_fn.tokenizer
    for batch in loader:
        assert batch["image"].shape[1:] == (3, 32, 32)
        assert "skipped" not in batch
        captions += tok.batch_decode(batch["input_ids"], batch["attention_mask"])
        image_ids += batch["image_id"].tolist()
    return captions, image_ids


@pytest.fixture(scope="module")
def csv_manifest(bad_dir):
    lines = ["filepath,title"] + [f"{p},{c}" for p, c in _rows()]
    data = ("\n".join(lines) + "\n").encode() + b"img/coffee.jpg,\xff\xfe broken \xff bytes\n"  # non-text
    (bad_dir / "manifest.csv").write_bytes(data)
    return bad_dir / "manifest.csv"


def test_csv_manifest_yields_exactly_the_good_samples(csv_manifest, caplog):
    ds, loader = _loader(csv_manifest)
    with caplog.at_level(logging.WARNING, logger="mmlm.data"):
        captions, image_ids = _run(loader)
    assert sorted(captions) == sorted(c for caps in GOOD.values() for c in caps)
    assert loader.stats.history == [EXPECTED]
    assert loader.stats.good == 4
    # the two coffee captions share one image_id; different images do not
    by_caption = dict(zip(captions, image_ids))
    assert by_caption["a cup of espresso"] == by_caption["a red saucer with a spoon"] != by_caption["a tabby cat"]
    # logged once per reason, with the offending path
    first = [r.getMessage() for r in caplog.records if "skipping bad sample" in r.getMessage()]
    assert len(first) == len(EXPECTED)
    assert any("[decompression_bomb]" in m and "bomb.png" in m for m in first)
    assert any("epoch done, 4 good samples, 7 skipped" in r.getMessage() for r in caplog.records)


def test_replace_mode_keeps_batches_full(csv_manifest):
    ds = ImageTextDataset(csv_manifest, transform=image_transform("clip-tiny", train=False))
    collate = ImageTextCollator(get_tokenizer("clip"), context_length=32)
    loader = SkippingDataLoader(ReplaceBad(ds), batch_size=4, num_workers=2, collate_fn=collate)
    captions, _ = _run(loader)
    assert len(captions) == len(ds) == 11  # every slot filled: batches of 4, 4, 3
    assert set(captions) <= {c for caps in GOOD.values() for c in caps}
    counts = loader.stats.history[0]
    assert set(counts) == set(EXPECTED) and all(counts[k] >= n for k, n in EXPECTED.items())


def test_jsonl_manifest_with_caption_lists_and_non_text(bad_dir):
    rows = [{"filepath": p, "title": c} for p, c in _rows()]
    rows.append({"filepath": "img/coffee.jpg", "title": 42})  # non-text
    rows.append({"filepath": "img/camera.jpg", "title": ["a tripod", None]})  # one good, one non-text
    (bad_dir / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds, loader = _loader(bad_dir / "manifest.jsonl", num_workers=0)
    for _ in range(2):  # counts restart every epoch
        captions, _ = _run(loader)
        assert sorted(captions) == sorted([c for caps in GOOD.values() for c in caps] + ["a tripod"])
    assert loader.stats.history == [{**EXPECTED, "non_text": 2}] * 2
    assert loader.stats.total["non_text"] == 4


def test_all_bad_dataset_fails_with_a_clear_message(bad_dir):
    (bad_dir / "all_bad.csv").write_text("filepath,title\nimg/missing.jpg,a\nimg/empty.jpg,b\nimg/corrupt.jpg,c\n")
    _, loader = _loader(bad_dir / "all_bad.csv", num_workers=0)
    with pytest.raises(RuntimeError, match=r"all 3 samples of the epoch were bad.*missing_file.*missing.jpg"):
        list(loader)


def test_fails_early_without_reading_the_whole_epoch(bad_dir):
    (bad_dir / "many_bad.csv").write_text("filepath,title\n" + "img/missing.jpg,a\n" * 5000)
    _, loader = _loader(bad_dir / "many_bad.csv", num_workers=0)
    loader.stats.fail_after = 100
    with pytest.raises(RuntimeError, match="the first 100 samples read were all bad"):
        list(loader)


def test_manifest_column_errors_are_raised_at_construction(bad_dir):
    (bad_dir / "cols.csv").write_text("path,caption\nimg/coffee.jpg,a cup\n")
    with pytest.raises(ValueError, match=r"no column\(s\) \['filepath', 'title'\]"):
        ImageTextDataset(bad_dir / "cols.csv")
    ds = ImageTextDataset(bad_dir / "cols.csv", image_key="path", caption_key="caption")
    assert ds[0]["text"] == "a cup"


def test_image_folder_classification_skips_bad_files(bad_dir, tmp_path):
    for cls, files in {"cat": ["chelsea.jpg", "empty.jpg"], "coffee": ["coffee.jpg", "corrupt.jpg"]}.items():
        (tmp_path / cls).mkdir()
        for f in files:
            shutil.copy(bad_dir / "img" / f, tmp_path / cls / f)
    ds = ImageClassificationDataset(tmp_path, image_transform("vit-tiny", train=False))
    assert ds.classes == ["cat", "coffee"]
    loader = SkippingDataLoader(ds, batch_size=4, collate_fn=ImageClassificationCollator())
    (batch,) = list(loader)
    assert batch["label"].tolist() == [0, 1] and batch["image"].shape == (2, 3, 32, 32)
    assert loader.stats.history == [{"corrupt_image": 1, "empty_file": 1}]


def test_csv_classification_with_class_names(bad_dir):
    (bad_dir / "cls.csv").write_text(
        "filepath,label\nimg/chelsea.jpg,cat\nimg/coffee.jpg,cup\nimg/missing.jpg,cat\nimg/camera.jpg,\n"
    )
    ds = ImageClassificationDataset(bad_dir / "cls.csv", image_transform("vit-tiny", train=False))
    loader = SkippingDataLoader(ds, batch_size=8, collate_fn=ImageClassificationCollator())
    (batch,) = list(loader)
    assert ds.classes == ["cat", "cup"] and batch["label"].tolist() == [0, 1]
    assert loader.stats.history == [{"missing_file": 1, "bad_label": 1}]

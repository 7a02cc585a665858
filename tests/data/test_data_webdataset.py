"""WebDataset shards through ImageTextDataModule: 2 workers x 2 simulated ranks."""

import io
import json
import tarfile

import pytest
import webdataset as wds

from mmlm.data import ImageTextDataModule

SIZES = [9, 11, 12, 14]  # uneven on purpose: 46 samples


def write_shard(path, samples):
    """A .tar shard; each sample dict has ``__key__`` and members such as ``jpg`` / ``txt``."""
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory, digit_jpegs):
    d = tmp_path_factory.mktemp("shards")
    i = 0
    for s, n in enumerate(SIZES):
        samples = []
        for _ in range(n):
            jpg, caption = digit_jpegs[i]
            samples.append({"__key__": f"s{i:04d}", "jpg": jpg, "txt": caption})
            i += 1
        write_shard(d / f"train-{s:03d}.tar", samples)
    return d


def _datamodule(urls, **kw):
    kw = {"preset": "clip-tiny", "tokenizer": "clip", "batch_size": 4, "num_workers": 2, **kw}
    dm = ImageTextDataModule(train_data=urls, **kw)
    dm.setup("fit")
    return dm, dm.train_dataloader()


@pytest.mark.slow
def test_one_pass_mode_reads_every_sample_exactly_once(shards, monkeypatch):
    urls = str(shards / "train-{000..003}.tar")
    keys = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm, loader = _datamodule(urls, drop_last=False)
        for epoch in range(2):
            seen = []
            for batch in loader:
                assert batch["image"].shape[1:] == (3, 32, 32) and batch["input_ids"].shape[0] == len(batch["key"])
                assert batch["image_id"].unique().numel() == len(batch["key"])
                seen += batch["key"]
            if epoch == 0:
                keys += seen
            assert len(seen) == len(set(seen))
    names = [k.rsplit(":", 1)[1] for k in keys]
    assert sorted(names) == [f"s{i:04d}" for i in range(sum(SIZES))]  # none lost, none repeated


@pytest.mark.slow
def test_resampled_mode_has_a_fixed_epoch_length(shards, monkeypatch):
    urls = str(shards / "train-{000..003}.tar")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm, loader = _datamodule(urls, resampled=True, epoch_length=40)
        # 40 samples / (4 per batch x 2 ranks) = 5 batches, rounded up to 3 per worker x 2 workers
        assert len(loader) == 6
        for _ in range(2):
            sizes = [len(b["key"]) for b in loader]
            assert sizes == [4] * 6


@pytest.mark.slow
def test_declared_epoch_length_evens_out_uneven_ranks(shards, monkeypatch):
    # the 2 ranks get different amounts of data; with epoch_length both yield the same batch count
    urls = str(shards / "train-{000..003}.tar")
    one_pass, declared = [], []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        _, loader = _datamodule(urls, num_workers=1, drop_last=False)
        one_pass.append(sum(1 for _ in loader))
        _, loader = _datamodule(urls, epoch_length=46, num_workers=1)
        declared.append(sum(1 for _ in loader))
        assert len(loader) == 6  # ceil(46 / (4 x 2))
    assert one_pass[0] != one_pass[1]
    assert declared == [6, 6]


def test_broken_shard_members_are_skipped_and_counted(tmp_path, digit_jpegs):
    good = [{"__key__": f"g{i}", "jpg": digit_jpegs[i][0], "txt": digit_jpegs[i][1]} for i in range(5)]
    bad = [
        {"__key__": "no_caption", "jpg": digit_jpegs[5][0]},
        {"__key__": "no_image", "txt": "a caption without its image"},
        {"__key__": "corrupt", "jpg": b"\xff\xd8\xff not really a jpeg", "txt": "broken bytes"},
        {"__key__": "empty_caption", "jpg": digit_jpegs[6][0], "txt": "  "},
        {"__key__": "binary_caption", "jpg": digit_jpegs[7][0], "txt": b"\xff\xfe\xfa"},
        {"__key__": "json_caption", "jpg": digit_jpegs[8][0], "json": json.dumps({"caption": "from json"}).encode()},
    ]
    write_shard(tmp_path / "a-000.tar", good[:3] + bad)
    # a shard cut in the middle of its 4th image: 3 samples readable, then a read error
    full = write_shard(tmp_path / "a-001.tar", good[3:] + [
        {"__key__": f"t{i}", "jpg": digit_jpegs[10 + i][0], "txt": "x"} for i in range(3)
    ])  # fmt: skip
    with tarfile.open(full) as tf:
        member = [m for m in tf.getmembers() if m.name.endswith(".jpg")][3]
    data = full.read_bytes()
    full.write_bytes(data[: member.offset_data + member.size // 2])

    _, loader = _datamodule(str(tmp_path / "a-{000..001}.tar"), num_workers=0, drop_last=False, batch_size=3)
    keys = [k.rsplit(":", 1)[1] for b in loader for k in b["key"]]
    assert sorted(keys) == ["g0", "g1", "g2", "g3", "g4", "json_caption", "t0"]
    assert loader.stats.history == [
        {"broken_shard": 1, "corrupt_image": 1, "empty_text": 1, "missing_field": 2, "non_text": 1}
    ]


def test_json_caption_lists(tmp_path, digit_jpegs):
    samples = [
        {"__key__": f"k{i}", "png": _png(jpg), "json": json.dumps({"caption": [f"cap {i}", f"alt {i}"]}).encode()}
        for i, (jpg, _) in enumerate(digit_jpegs[:4])
    ]
    write_shard(tmp_path / "b.tar", samples)
    _, loader = _datamodule(str(tmp_path / "b.tar"), num_workers=0, drop_last=False, tokenizer="assets/tokenizer")
    (batch,) = list(loader)  # batches are collated inside the workers
    decoded = loader.dataset.collate.tokenizer.batch_decode(batch["input_ids"])
    assert sorted(int(t.split()[1]) for t in decoded) == [0, 1, 2, 3]
    assert {t.split()[0] for t in decoded} <= {"cap", "alt"}


def _png(jpg: bytes) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(jpg)).save(buf, format="PNG")
    return buf.getvalue()

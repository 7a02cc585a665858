"""IVF indexes built in shards and merged into on-disk inverted lists (``mmlm.retrieval.ondisk``): the same
answers as one index built in memory after the same training, shards written by several processes, the merge
writing FAISS's own bytes with memory that does not grow with the shards, lists memory-mapped rather than read
on open, a kill during the shards or the merge resumed, an add that appends shards to the base's lists, and
the index chosen under a memory budget."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from faiss_merge import merge_from_multiple
from torch import nn

from mmlm.cli import main
from mmlm.retrieval import Index, add_to_index, build_index
from mmlm.retrieval.choose import choose_index
from mmlm.retrieval.index import describe, read_faiss
from mmlm.retrieval.ondisk import emptied, merge_shards, plan_shards, shard_path, write_shards
from mmlm.retrieval.options import Job, Options, parse_size
from mmlm.retrieval.write import write_index

ROOT = Path(__file__).resolve().parents[2]
CPU = {"accelerator": "cpu"}

pytestmark = pytest.mark.usefixtures("one_thread")


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors around ``n / 100`` centres (as scripts/bench_retrieval.py's ``mixture``)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 100), dim), np.float32)
    x = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, dim), np.float32) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def shards_by_processes(shards: Path, plan: dict, world: int) -> None:
    """``world`` processes at once, each writing its shards of ``plan`` (as the ranks of several nodes do)."""
    code = ("import json, sys; from pathlib import Path; from mmlm.retrieval.ondisk import write_shards; "
            "print(write_shards(Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()), int(sys.argv[3]), "
            "int(sys.argv[4])))")  # fmt: skip
    plan_file = shards / f"{plan['modality']}.plan.json"
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(shards), str(plan_file), str(rank), str(world)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(world)]  # fmt: skip
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        assert int(out.strip()) == plan["shards"] // world  # each wrote its own share, none twice


@pytest.mark.processes
@pytest.mark.slow
def test_four_shards_by_two_processes_answer_as_one_index_in_memory(tmp_path):
    vectors = clustered(10_000, 64)
    np.save(tmp_path / "image_embeds.npy", vectors)
    ids = np.arange(10_000, dtype=np.int64)
    shards = tmp_path / "shards"
    plan = plan_shards(shards, "image", tmp_path / "image_embeds.npy", 0, ids, "IVF64,PQ16", 8, shard_rows=2500)
    assert plan["shards"] == 4
    shards_by_processes(shards, plan, world=2)
    merged = merge_shards(shards, plan, tmp_path / "image.index")
    faiss.write_index(merged, str(tmp_path / "image.index"))
    # the same training, all vectors added at once in memory
    whole = faiss.read_index(str(shards / "image.trained.index"))
    whole.add_with_ids(vectors, ids)
    opened = read_faiss(tmp_path / "image.index", ondisk=True)
    assert opened.ntotal == whole.ntotal == 10_000
    queries = clustered(200, 64, seed=1)
    scores_disk, ids_disk = opened.search(queries, 10)
    scores_ram, ids_ram = whole.search(queries, 10)
    np.testing.assert_array_equal(ids_disk, ids_ram)
    np.testing.assert_array_equal(scores_disk, scores_ram)
    assert (ids_disk >= 0).all() and faiss.extract_index_ivf(opened).nprobe == 8


def assert_same_merge(ours: faiss.Index, ours_out: Path, reference: faiss.Index, reference_out: Path) -> None:
    """The same .ivfdata bytes and the same .index bytes (list directory, free slots, total size), once the
    reference names our lists' file (the only field that differs: the path)."""
    assert ours_out.with_suffix(".ivfdata").read_bytes() == reference_out.with_suffix(".ivfdata").read_bytes()
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(reference).invlists)
    lists.filename = str(ours_out.with_suffix(".ivfdata"))
    np.testing.assert_array_equal(faiss.serialize_index(ours), faiss.serialize_index(reference))


def test_the_merge_writes_the_bytes_of_faiss_merge_from_multiple(tmp_path):
    """A build (3 shards) and an add to it (its base's lists, then 4 shards, the last with most lists empty:
    FAISS stores such a shard's sizes sparse): bit for bit what ``merge_from_multiple`` writes."""
    vectors = clustered(6_000, 32)
    np.save(tmp_path / "v.npy", vectors)
    shards, ids = tmp_path / "shards", np.arange(6_000, dtype=np.int64)
    plan = plan_shards(shards, "image", tmp_path / "v.npy", 0, ids[:2_000], "IVF64,PQ8", 64, shard_rows=700)
    write_shards(shards, plan)
    for folder in ("base", "grown", "ref"):
        (tmp_path / folder).mkdir()
    first = tmp_path / "base" / "image.index"
    base = merge_shards(shards, plan, first)
    faiss.write_index(base, str(first))
    reference = merge_from_multiple(shards, plan, tmp_path / "ref" / "image.index")
    assert_same_merge(base, first, reference, tmp_path / "ref" / "image.index")

    plan = plan_shards(shards, "image", tmp_path / "v.npy", 2_000, ids[2_000:], "IVF64,PQ8", None, shard_rows=1_323,
                       trained=emptied(first))  # fmt: skip
    write_shards(shards, plan)
    assert plan["shards"] == 4
    last = faiss.read_index(str(shard_path(shards, plan, 3)))  # kept: its lists are freed with it
    # 31 vectors in 64 lists: FAISS writes this shard's list sizes sparse
    assert sum(faiss.extract_index_ivf(last).invlists.list_size(j) > 0 for j in range(64)) <= 31
    grown = merge_shards(shards, plan, tmp_path / "grown" / "image.index", base=first)
    reference = merge_from_multiple(shards, plan, tmp_path / "ref" / "grown.index", base=first)
    assert grown.ntotal == reference.ntotal == 6_000
    assert_same_merge(grown, tmp_path / "grown" / "image.index", reference, tmp_path / "ref" / "grown.index")
    faiss.write_index(grown, str(tmp_path / "grown" / "image.index"))
    opened = read_faiss(tmp_path / "grown" / "image.index", ondisk=True)  # as Index.open reads it
    for index in (opened, reference):
        faiss.extract_index_ivf(index).nprobe = 64
    found, expected = opened.search(vectors[::50], 10), reference.search(vectors[::50], 10)
    np.testing.assert_array_equal(found[1], expected[1])
    np.testing.assert_array_equal(found[0], expected[0])
    # PQ8 (2 bits a dimension): most queries find themselves
    assert np.mean([i in row for i, row in zip(range(0, 6_000, 50), found[1])]) > 0.7


MERGE = ("import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[4]); "
         "from mmlm.retrieval.ondisk import merge_shards; from faiss_merge import merge_from_multiple; "
         "status = lambda key: int(open('/proc/self/status').read().split(key + ':')[1].split()[0]) * 1024; "
         "before = status('VmRSS'); merge = merge_shards if sys.argv[3] == 'ours' else merge_from_multiple; "
         "merged = merge(Path(sys.argv[1]), json.loads(sys.argv[2]), Path(sys.argv[5])); "
         "print(status('VmHWM') - before)")  # fmt: skip


@pytest.mark.processes
def test_the_merge_memory_does_not_grow_with_the_shards(tmp_path):
    """The peak resident memory a merge adds, in a process of its own: 8 shards of 20,000 vectors (42 MB of
    lists) against the first 2 of them. FAISS's merge (the reference) keeps every page of its maps resident;
    ours copies list by list through the page cache."""
    vectors = clustered(160_000, 64)
    np.save(tmp_path / "v.npy", vectors)
    shards = tmp_path / "shards"
    plan = plan_shards(shards, "image", tmp_path / "v.npy", 0, np.arange(160_000), "IVF64,Flat", 8, shard_rows=20_000)
    write_shards(shards, plan)
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    grown, lists = {}, {}
    for how, count in (("ours", 2), ("ours", 8), ("reference", 8)):
        (tmp_path / how).mkdir(exist_ok=True)
        out = tmp_path / how / f"{count}.index"
        args = [str(shards), json.dumps(plan | {"shards": count}), how, str(Path(__file__).parent), str(out)]
        run = subprocess.run([sys.executable, "-c", MERGE, *args], capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        grown[how, count] = int(run.stdout.split()[-1])
        lists[how, count] = out.with_suffix(".ivfdata").stat().st_size
    assert lists["ours", 8] == lists["reference", 8] == 160_000 * (64 * 4 + 8)
    extra = lists["ours", 8] - lists["ours", 2]  # 6 more shards: 32 MB more lists
    assert grown["reference", 8] > lists["reference", 8]  # the test sees what it measures: FAISS's merge holds them
    assert grown["ours", 8] - grown["ours", 2] < 0.05 * extra, (grown, lists)
    assert grown["ours", 8] < 0.2 * lists["ours", 8], (grown, lists)  # one list at a time, and the directory


def vector_folder(folder: Path, vectors: np.ndarray, options: Options) -> None:
    """An index folder of ``vectors`` (no model run), as scripts/bench_ondisk.py writes its indexes."""
    items = [{"meta": {"filepath": f"{i:07d}.jpg"}, "captions": [], "skips": []} for i in range(len(vectors))]
    merged = {"image": vectors, "text": np.zeros((0, vectors.shape[1]), np.float32),
              "text_owner": np.zeros(0, np.int64), "items": items}  # fmt: skip
    job = Job("build", "vectors", "0" * 64, "synthetic", "", "", None, None, None, 0, 1)
    write_index(folder, merged, {}, job, options, None, "caption", nn.Identity(), 0.0)


RSS = ("import sys, resource; from mmlm.retrieval import Index; "
       "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize(); "
       "before = rss(); index = Index.open(sys.argv[1]); after = rss(); "
       "index.search(index.embeddings()[:5], k=10); print(before, after, rss())")  # fmt: skip


def test_open_maps_the_lists_instead_of_reading_them(tmp_path):
    vectors = clustered(100_000, 128)
    vector_folder(tmp_path / "ix", vectors, Options(index_type="IVF256,Flat", nprobe=4, shard_size=30_000))
    lists = (tmp_path / "ix" / "image.ivfdata").stat().st_size
    assert lists >= 100_000 * (128 * 4 + 8)  # every vector and its id, on disk
    run = subprocess.run([sys.executable, "-c", RSS, str(tmp_path / "ix")], capture_output=True, text=True,
                         env=os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    before, after, searched = map(int, run.stdout.split())
    assert after - before < 0.1 * lists  # opened: the lists are mapped, not read
    # 5 queries read 20 of the 256 lists (with the kernel's read-ahead around each), as page cache
    assert searched - before < 0.6 * lists
    with Index.open(tmp_path / "ix") as index:
        ids, scores = index.search(vectors[:3], k=1)
        assert ids[:, 0].tolist() == [0, 1, 2]
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def mmlm_index(*args: str, cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MMLM_DEBUG"}
    env |= {"PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "mmlm.cli", "index", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip


OPTIONS = ["--split", "train", "--batch_size", "64", "--chunk_size", "512", "--accelerator", "cpu",
           "--index_type", "IVF8,Flat", "--nprobe", "8", "--shard_size", "8"]  # fmt: skip


@pytest.mark.processes
@pytest.mark.slow
def test_sigkill_during_the_merge_keeps_the_previous_index_and_resume_finishes(assets_index, tmp_path, capsys):
    out = tmp_path / "ix"
    shutil.copytree(assets_index.folder, out)
    before = Index.open(out)
    proc = mmlm_index("build", "clip-tiny", "digits", "--out", str(out), "--overwrite", *OPTIONS, cwd=tmp_path)
    shards = tmp_path / ".ix.partial" / "shards"
    deadline = time.monotonic() + 300
    while not list(shards.glob("image.*.0*.index")):  # the embedding is done: shards, then the merge
        assert proc.poll() is None, f"the build ended before its shards:\n{proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list(shards.glob("image.*.0*.index")))
    assert 1 <= written < 1437 // 8  # 180 shards of 8 digits: killed among them
    after = Index.open(out)
    assert after.manifest == before.manifest and after.files == before.files  # the previous index, whole
    assert len(after.search(after.embeddings()[:2], k=3)[0]) == 2

    main(["index", "build", "clip-tiny", "digits", "--out", str(out), "--overwrite", *OPTIONS, "--resume"])
    err = capsys.readouterr().err
    assert "resuming from" in err and f"{written} of 180 image shards already written" in err
    whole = build_index("clip-tiny", "digits", tmp_path / "whole", split="train", batch_size=64,
                        index_type="IVF8,Flat", nprobe=8, shard_size=8, **CPU)  # fmt: skip
    resumed = Index.open(out)
    assert resumed.manifest["indexes"]["image"]["ondisk"] == "image.ivfdata" and len(resumed) == 1437
    queries = whole.embeddings()[:50]
    ids_a, scores_a = resumed.search(queries, k=5)
    ids_b, scores_b = whole.search(queries, k=5)
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_allclose(scores_a, scores_b, atol=1e-6)
    assert not (tmp_path / ".ix.partial").exists()


@pytest.mark.slow
def test_add_appends_shards_to_the_lists_on_disk(tmp_path):
    index = build_index("clip-tiny", "digits", tmp_path / "ix", index_type="IVF8,Flat", nprobe=8, **CPU)
    first = index.files
    stamps = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in first.iterdir()}
    index.close()
    grown = add_to_index(tmp_path / "ix", "assets", shard_size=8, **CPU)
    assert grown is not None and grown.files != first and len(grown) == 360 + 21
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in first.iterdir()} == stamps  # untouched
    entry = grown.manifest["indexes"]["image"]
    assert entry["ondisk"] == "image.ivfdata" and entry["ntotal"] == 381 and entry["nprobe"] == 8
    # the build's training kept: the same index as the trained base refilled with all 381 vectors in memory
    reference = emptied(first / "image.index")  # in memory: ArrayInvertedLists
    vectors = np.asarray(grown.embeddings("image"), np.float32)
    reference.add_with_ids(vectors, np.arange(381, dtype=np.int64))
    scores_a, ids_a = grown.faiss("image").search(vectors, 5)
    scores_b, ids_b = reference.search(vectors, 5)
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_array_equal(scores_a, scores_b)
    grown.close()


def test_the_index_is_chosen_under_the_memory_budget():
    assert choose_index(500, 512, parse_size("1G"))[0] == "Flat"
    assert choose_index(200_000, 512, parse_size("1G"))[0] == "Flat"  # 400 MB of exact vectors fit
    assert choose_index(200_000, 512, parse_size("300M"))[0] == "IVF2048,PQ256"  # 200k x (256 + 8) B
    assert choose_index(2_000_000, 512, parse_size("16G"))[0] == "HNSW32"  # 2M x (2 KiB + 256 B) fit
    assert choose_index(2_000_000, 512, parse_size("4.2G"))[0] == "IVF4096,Flat"  # HNSW: 4.6 GB
    spec, reason = choose_index(100_000_000, 512, parse_size("4G"))
    assert spec == "IVF32768,PQ32" and "of the 4 GiB budget" in reason  # 100M x (32 + 8) B = 3.7 GiB
    with pytest.raises(ValueError, match="need at least"):
        choose_index(1_000_000_000, 512, parse_size("4G"))
    assert parse_size("512M") == 512 << 20 and parse_size("1.5GiB") == 3 << 29 and parse_size("1000") == 1000
    with pytest.raises(ValueError, match="give a size"):
        parse_size("lots")


@pytest.mark.slow  # training the PQ: 10 s on one thread
def test_auto_under_a_budget_is_tuned_and_recorded(tmp_path, capsys):
    vectors = clustered(12_000, 32)
    vector_folder(tmp_path / "ix", vectors, Options(max_index_memory="500K", query_ms=50.0))
    with Index.open(tmp_path / "ix") as index:
        entry = index.manifest["indexes"]["image"]
        assert entry["type"] == "IVF256,PQ16" and entry["ondisk"] == "image.ivfdata"  # 12k x 24 B < 500 KiB
        assert entry["choice"]["max_index_memory"] == "500K" and "IVF-PQ16" in entry["choice"]["reason"]
        tuning = entry["tuning"]
        assert tuning["nprobe"] == entry["nprobe"] == faiss.extract_index_ivf(index.faiss()).nprobe
        assert tuning["recall@10"] >= 0.9 and tuning["query_ms"] <= 50.0 and tuning["queries"] == 100
        # the depth is tuned with nprobe: the best recall in time over every depth tried, and search uses it
        within = [t for t in tuning["tried"] if t["ms"] <= 50.0]
        assert tuning["recall@10"] == max(t["recall"] for t in within)
        assert {t["rerank"] for t in tuning["tried"]} == {10, 30, 100} and entry["rerank"] == tuning["rerank"]
        queries = np.ascontiguousarray(vectors[:20])
        np.testing.assert_array_equal(
            index.search(queries, 10)[0], index.search(queries, 10, rerank=entry["rerank"])[0]
        )
        text = describe(index.manifest, tmp_path / "ix")
    assert f"nprobe tuned: recall@10 {tuning['recall@10']:.3f} after re-ranking {tuning['rerank']} x k" in text
    assert "+ image.ivfdata on disk" in text and "chosen: 12,000 vectors, IVF-PQ16" in text
    assert json.loads((tmp_path / "ix" / "manifest.json").read_text())["indexes"]["image"]["tuning"] == tuning


def test_a_missing_shard_is_written_by_the_merge(tmp_path, capfd):
    """A process that died without its shards: the merge writes them (a shard is complete or absent); FAISS's
    own "resizing FILE" line does not reach standard output."""
    vectors = clustered(2_000, 32)
    np.save(tmp_path / "v.npy", vectors)
    shards = tmp_path / "shards"
    plan = plan_shards(shards, "image", tmp_path / "v.npy", 0, np.arange(2_000), "IVF16,Flat", 16, shard_rows=500)
    assert write_shards(shards, plan, rank=0, world=2) == 2  # shards 0 and 2; rank 1 never ran
    assert not shard_path(shards, plan, 1).exists()
    capfd.readouterr()
    merged = merge_shards(shards, plan, tmp_path / "image.index")
    assert capfd.readouterr().out == ""
    assert merged.ntotal == 2_000 and shard_path(shards, plan, 3).exists()
    _, ids = merged.search(vectors[:20], 1)
    assert ids[:, 0].tolist() == list(range(20))


@pytest.mark.processes
@pytest.mark.slow
def test_two_ranks_share_the_shards_and_give_what_one_process_gives(tmp_path):
    """`--devices 2`: both gloo ranks embed, then rank 1 writes its shards while rank 0 writes its own, waits
    for rank 1's and merges them: what a multi-node launch does with a shared folder."""
    args = ["assets", "--batch_size", "4", "--chunk_size", "4", "--accelerator", "cpu", "--index_type", "IVF2,Flat",
            "--nprobe", "2", "--shard_size", "4"]  # fmt: skip
    proc = mmlm_index("build", "clip-tiny", *args, "--out", str(tmp_path / "two"), "--devices", "2", cwd=tmp_path)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    assert "MEMBER: 2/2" in log and "rank 1 wrote " in log  # 6 image + 13 caption shards, the odd ones rank 1's
    one = build_index("clip-tiny", "assets", tmp_path / "one", batch_size=4, index_type="IVF2,Flat", nprobe=2,
                      shard_size=4, **CPU)  # fmt: skip
    two = Index.open(tmp_path / "two")
    assert two.manifest["indexes"]["image"]["ondisk"] == "image.ivfdata" and len(two) == 21
    for modality in ("image", "text"):
        ids_a, scores_a = two.search(one.embeddings("image"), k=5, modality=modality)
        ids_b, scores_b = one.search(one.embeddings("image"), k=5, modality=modality)
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_allclose(scores_a, scores_b, atol=1e-6)
    assert not (tmp_path / ".two.partial").exists()


@pytest.mark.slow
def test_sync_refills_an_on_disk_index_with_its_training(tmp_path):
    """`index sync` renumbers the ids: the lists are refilled through shards, on disk, the clusters kept."""
    from test_index_sync import change, make_folder  # the sync tests' folder of noise images and its changes

    from mmlm.retrieval.sync import sync_index

    make_folder(tmp_path / "images", 60)
    build_index("clip-tiny", str(tmp_path / "images"), tmp_path / "ix", batch_size=64, index_type="IVF4,Flat",
                nprobe=4, **CPU).close()  # fmt: skip
    first = Index.open(tmp_path / "ix")
    change(tmp_path / "images")
    synced, report = sync_index(tmp_path / "ix")
    assert report["version"] is not None and len(synced) == 60 - 2 + 4
    entry = synced.manifest["indexes"]["image"]
    assert entry["ondisk"] == "image.ivfdata" and entry["ntotal"] == len(synced)
    centroids = [faiss.extract_index_ivf(ix.faiss()).quantizer.reconstruct_n(0, 4) for ix in (first, synced)]
    np.testing.assert_array_equal(*centroids)  # trained once, at the build
    vectors = np.asarray(synced.embeddings(), np.float32)
    ids, scores = synced.search(vectors, k=1)  # every list probed: exact
    assert ids[:, 0].tolist() == list(range(len(synced)))
    first.close()
    synced.close()

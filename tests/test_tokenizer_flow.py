"""A tokenizer trained with ``mmlm tokenizer train`` goes with the checkpoint trained on it, into every command:
``index build``, ``serve``, ``zeroshot`` and ``convert --to hf``.

The run's checkpoint carries the tokenizer (``mmlm.factory.CKPT_TOKENIZER``): the tokenizer folder is deleted
before the commands run, so any command that used another tokenizer (the CLIP BPE, the default for a CLIP)
would fail or give other numbers.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from mmlm.cli import lightning_cli, main
from mmlm.data import get_tokenizer
from mmlm.data.digits import DIGIT_CLASSNAMES
from mmlm.data.eval_datasets import classification_data
from mmlm.eval.zeroshot import zero_shot_classify
from mmlm.factory import load
from mmlm.paths import ASSETS
from mmlm.retrieval import Index

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_cli import DIGITS, QUICK  # noqa: E402

VOCAB = 500  # a WordPiece vocabulary of the bundled corpus: [PAD] 0, [CLS] 2, [SEP] 3
TEXTS = [f"a photo of the number {name}." for name in DIGIT_CLASSNAMES] + ["Zwölf, über 10 000 kilometres away!"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """(the .ckpt of a tiny CLIP fit for 3 steps on its own tokenizer, that tokenizer's ids of ``TEXTS``)."""
    root = tmp_path_factory.mktemp("flow")
    tok_dir = root / "tok"
    main(["tokenizer", "train", str(ASSETS / "corpus.txt"), "--vocab_size", str(VOCAB), "--out", str(tok_dir)])
    tok = get_tokenizer(tok_dir)
    assert tok.vocab_size == VOCAB and tok.eos_token_id == 3
    text = json.dumps({"text": {"vocab_size": VOCAB, "eot_token_id": tok.eos_token_id, "pad_token_id": 0}})
    lightning_cli(["fit", "--config", str(DIGITS), *QUICK, "--trainer.max_steps", "3", "--trainer.default_root_dir",
                   str(root / "runs"), "--data.init_args.tokenizer", str(tok_dir),
                   "--model.init_args.model_overrides", text])  # fmt: skip
    ids = tok(TEXTS)["input_ids"]
    shutil.rmtree(tok_dir)  # from here on, only the checkpoint knows the tokenizer
    return root / "runs" / "version_0" / "checkpoints" / "last.ckpt", ids


@pytest.mark.slow
def test_the_factory_gives_the_checkpoint_its_own_tokenizer(trained):
    ckpt, ids = trained
    loaded = load(ckpt)
    assert loaded.tokenizer_source == "checkpoint"
    assert torch.equal(loaded.tokenizer(TEXTS)["input_ids"], ids)
    assert ids.max() < VOCAB and not torch.equal(get_tokenizer("clip")(TEXTS)["input_ids"][:, : ids.shape[1]], ids)


@pytest.mark.slow
def test_index_build_embeds_captions_with_it(trained, tmp_path):
    ckpt, _ = trained
    main(["index", "build", str(ckpt), "digits", "--split", "test", "--out", str(tmp_path / "ix")])
    loaded = load(ckpt)
    with Index.open(tmp_path / "ix") as index:
        item = int(index.text_ids[0])
        captions = index.metadata([item])[0]["captions"]
        rows = np.array(index.embeddings("text")[: len(captions)])
    tokens = loaded.tokenizer(captions)
    with torch.no_grad():
        expected = loaded.model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(torch.as_tensor(rows, dtype=torch.float32), expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_serve_answers_queries_with_it(trained, tmp_path):
    from fastapi.testclient import TestClient

    from mmlm.serve.app import create_app
    from mmlm.serve.served import open_indexes
    from mmlm.serve.settings import Settings

    ckpt, _ = trained
    main(["index", "build", str(ckpt), "digits", "--split", "test", "--out", str(tmp_path / "ix")])
    loaded = load(ckpt)
    tokens = loaded.tokenizer(TEXTS[:3])
    with torch.no_grad():
        expected = loaded.model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    app = create_app(Settings(threads=1), open_indexes({"digits": str(tmp_path / "ix")}))
    with TestClient(app) as client:
        for text, vector in zip(TEXTS[:3], expected):
            answer = client.post("/embed", json={"text": text})
            assert answer.status_code == 200, answer.text
            torch.testing.assert_close(torch.tensor(answer.json()["embedding"]), vector, atol=1e-5, rtol=0)
        hits = client.post("/search", json={"text": TEXTS[0], "k": 3}).json()["hits"]
    assert len(hits) == 3 and hits[0]["score"] >= hits[-1]["score"]


@pytest.mark.slow
def test_zeroshot_classifies_with_it(trained, tmp_path):
    ckpt, _ = trained
    main(["zeroshot", str(ckpt), "--dataset", "digits", "--output", str(tmp_path / "z.json")])
    got = json.loads((tmp_path / "z.json").read_text())["metrics"]
    loaded = load(ckpt)
    data = classification_data("digits", loaded.transform, "test")
    expected, _, _ = zero_shot_classify(loaded.model, loaded.tokenizer, data.loader(64), data.classes,
                                        data.templates, progress=False)  # fmt: skip
    assert got == pytest.approx(expected, abs=1e-9)


@pytest.mark.slow
def test_convert_to_hf_writes_it(trained, tmp_path):
    ckpt, ids = trained
    main(["convert", str(ckpt), str(tmp_path / "hf"), "--to", "hf"])
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert hf(TEXTS, padding=True, return_tensors="pt")["input_ids"].tolist() == ids.tolist()

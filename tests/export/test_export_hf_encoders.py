"""mmlm BERT / GPT-2 / ViT -> transformers folders that transformers' own classes load, in a process
without mmlm, into the outputs mmlm computes; and back into the very same mmlm weights."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from _client import run_client

import mmlm
from mmlm.convert import ConversionError
from mmlm.export import export
from mmlm.export.convert import convert
from mmlm.models import clip_tower, text_with_heads
from mmlm.paths import ASSETS
from mmlm.tasks import TextClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "convert"))
from _parity import randomize_

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ASSETS / "tokenizer"
# bert-tiny on the bundled WordPiece vocabulary: its [SEP] / [MASK] ids
BERT = {"vocab_size": 4016, "eot_token_id": 3, "mask_token_id": 4}
TEXTS = ["a tiny model reads this", "and a second, longer sentence with more words in it", "short"]
PAIRS = ["the second segment", "yes", "a pair whose segment is the longest of the three texts here"]

# what the client loads each folder with, and the outputs it writes
CLIENT = """
import json, sys
import torch
import transformers as t

inputs = torch.load("inputs.pt")
report = {}

def run(name, auto, *fields, folder=None, **kwargs):
    model = getattr(t, auto).from_pretrained(folder or name).eval()
    with torch.no_grad():
        out = model(**kwargs)
    torch.save({f: getattr(out, f) for f in fields}, f"{name}.out.pt")
    report[name] = type(model).__name__

bert = {k: inputs["bert"][k] for k in ("input_ids", "attention_mask", "token_type_ids")}
run("bert", "AutoModel", "last_hidden_state", **bert)
run("bert_pretraining", "AutoModelForPreTraining", "prediction_logits", "seq_relationship_logits", **bert)
run("bert_tokens", "AutoModelForTokenClassification", "logits", **bert)
run("bert_sequence", "AutoModelForSequenceClassification", "logits", **bert)
run("bert_qa", "AutoModelForQuestionAnswering", "start_logits", "end_logits", **bert)
right, left = inputs["gpt2_right"], inputs["gpt2_left"]
run("gpt2_lm", "AutoModelForCausalLM", "logits", **right)
# left padding: positions counted from each text's first real token, as transformers' generate() does
run("gpt2_lm_left", "AutoModelForCausalLM", "logits", folder="gpt2_lm", **left,
    position_ids=(left["attention_mask"].cumsum(-1) - 1).clamp(min=0))
for name in ("vit", "vit_fit"):
    run(name, "AutoModelForImageClassification", "logits", pixel_values=inputs["images"])
    p = t.AutoImageProcessor.from_pretrained(name)
    report[name + "_processor"] = [type(p).__name__, dict(p.size), int(p.resample), list(p.image_mean),
                                   list(p.image_std)]

tok = t.AutoTokenizer.from_pretrained("bert")
enc = tok(inputs["texts"], inputs["pairs"], padding=True, return_tensors="pt")
report["tokens"] = {k: enc[k].tolist() for k in ("input_ids", "attention_mask", "token_type_ids")}
print(json.dumps(report))
"""


def _fit_vit(root: Path) -> tuple[torch.nn.Module, Path]:
    """Two steps of `mmlm fit` on the tiny digits config: the trained ViT and its last.ckpt."""
    from mmlm.cli import lightning_cli

    cli = lightning_cli(["fit", "--config", str(ROOT / "configs/finetune/image-digits-tiny.yaml"),
                         "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
                         "--trainer.default_root_dir", str(root / "runs"), "--data.batch_size", "8",
                         "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"])  # fmt: skip
    (ckpt,) = root.glob("runs/**/last.ckpt")
    return cli.model.model.eval(), ckpt


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every model exported into ``root``, its inputs saved, and one client run over all folders.

    Returns (root, the mmlm models by folder name, the inputs, the client's report).
    """
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    tok = mmlm.get_tokenizer(TOKENIZER)
    bert = randomize_(mmlm.create_model("bert-tiny", **BERT)).eval()
    gpt2 = randomize_(mmlm.create_model("gpt2-tiny")).eval()
    vit = randomize_(mmlm.create_model("vit-tiny", image_mean=(0.4, 0.5, 0.6), interpolation="bilinear")).eval()
    models = {
        "bert": bert,
        "bert_pretraining": randomize_(text_with_heads(bert, ["pooler", "mlm", "nsp"])).eval(),
        "bert_tokens": randomize_(text_with_heads(bert, ["token_classifier"], num_labels=5)).eval(),
        "bert_qa": randomize_(text_with_heads(bert, ["qa"])).eval(),
        # the model `mmlm fit` fine-tunes for text classification
        "bert_sequence": randomize_(TextClassification("bert-tiny", 3, model_overrides=BERT).model).eval(),
        "gpt2_lm": text_with_heads(gpt2, ["clm"]).eval(),
        "vit": vit,
    }
    for name, model in models.items():
        export(model, root / name, "hf", tokenizer=tok if name == "bert" else None)
    models["vit_fit"], ckpt = _fit_vit(root)
    convert(ckpt, root / "vit_fit", "hf")

    ids = torch.randint(0, 1000, (3, 9))
    right = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 7 + [0] * 2])
    inputs = {
        "bert": tok(TEXTS, PAIRS),
        "gpt2_right": {"input_ids": ids, "attention_mask": right},
        "gpt2_left": {"input_ids": ids, "attention_mask": right.flip(-1)},
        "images": torch.randn(2, 3, 32, 32),
        "texts": TEXTS,
        "pairs": PAIRS,
    }
    torch.save(inputs, root / "inputs.pt")
    report = run_client(CLIENT, cwd=root)
    return root, models, inputs, report


def _theirs(root: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(root / f"{name}.out.pt")


def _gap(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> float:
    gap = (ours - theirs).abs().max().item()
    print(f"[hf export] {what}: max|diff| = {gap:.2e}")
    assert ours.shape == theirs.shape and gap <= 1e-5, f"{what}: {gap}"
    return gap


@pytest.mark.slow
@torch.no_grad()
def test_bert_heads_give_transformers_outputs(exported):
    root, models, inputs, report = exported
    batch = inputs["bert"]
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    real = batch["attention_mask"].bool()
    assert report["bert"] == "BertModel"
    _gap(models["bert"].forward_features(*args)[real], _theirs(root, "bert")["last_hidden_state"][real], "BertModel")

    assert report["bert_pretraining"] == "BertForPreTraining"
    ours, theirs = models["bert_pretraining"](*args), _theirs(root, "bert_pretraining")
    _gap(ours["mlm_logits"][real], theirs["prediction_logits"][real], "BertForPreTraining prediction_logits")
    _gap(ours["nsp_logits"], theirs["seq_relationship_logits"], "BertForPreTraining seq_relationship_logits")

    assert report["bert_tokens"] == "BertForTokenClassification"
    ours, theirs = models["bert_tokens"](*args)["logits"], _theirs(root, "bert_tokens")["logits"]
    _gap(ours[real], theirs[real], "BertForTokenClassification logits")
    assert report["bert_sequence"] == "BertForSequenceClassification"
    ours, theirs = models["bert_sequence"](*args)["logits"], _theirs(root, "bert_sequence")["logits"]
    _gap(ours, theirs, "BertForSequenceClassification logits")
    assert report["bert_qa"] == "BertForQuestionAnswering"
    ours, theirs = models["bert_qa"](*args), _theirs(root, "bert_qa")
    for key in ("start_logits", "end_logits"):
        _gap(ours[key][real], theirs[key][real], f"BertForQuestionAnswering {key}")


def test_the_bert_tokenizer_loads_with_auto_tokenizer(exported):
    _, _, inputs, report = exported
    ours = inputs["bert"]
    assert report["tokens"] == {k: ours[k].tolist() for k in ("input_ids", "attention_mask", "token_type_ids")}


@torch.no_grad()
def test_gpt2_lm_logits_on_padded_batches(exported):
    root, models, inputs, report = exported
    assert report["gpt2_lm"] == "GPT2LMHeadModel"
    for side in ("right", "left"):
        batch = inputs[f"gpt2_{side}"]
        real = batch["attention_mask"].bool()
        ours = models["gpt2_lm"](batch["input_ids"], batch["attention_mask"])["clm_logits"]
        theirs = _theirs(root, "gpt2_lm" if side == "right" else "gpt2_lm_left")["logits"]
        _gap(ours[real], theirs[real], f"GPT2LMHeadModel logits, {side}-padded")


@torch.no_grad()
def test_vit_classifiers_and_their_image_processor(exported):
    root, models, inputs, report = exported
    for name in ("vit", "vit_fit"):
        assert report[name] == "ViTForImageClassification"
        _gap(models[name](inputs["images"]), _theirs(root, name)["logits"], f"{name}: ViTForImageClassification logits")
        cfg = models[name].cfg
        resample = {"bilinear": 2, "bicubic": 3}[cfg.interpolation]
        assert report[f"{name}_processor"] == [
            "ViTImageProcessor", {"height": cfg.image_size, "width": cfg.image_size}, resample,
            pytest.approx(list(cfg.image_mean)), pytest.approx(list(cfg.image_std)),
        ]  # fmt: skip
    assert report["vit_processor"][2:] == [2, pytest.approx([0.4, 0.5, 0.6]), [0.5] * 3]


def test_folders_load_back_into_the_same_weights(exported):
    root, models, _, _ = exported
    for name, model in models.items():
        back = mmlm.load_pretrained(root / name)
        assert type(back) is type(model) and back.cfg == model.cfg, name
        ours, theirs = model.state_dict(), back.state_dict()
        assert ours.keys() == theirs.keys(), name
        for key, value in ours.items():
            torch.testing.assert_close(theirs[key], value, rtol=0, atol=0, msg=f"{name}: {key}")


def _bert_tiny(**overrides):
    return mmlm.create_model("bert-tiny", **overrides)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: clip_tower(mmlm.create_model("clip-tiny"), "text"), "pool='eot', a CLIP-style text tower"),
        (lambda: _bert_tiny(pre_norm=True), "pre-LN blocks"),
        (lambda: mmlm.create_model("vit-tiny", class_token=False, pool="gap"), "no class token"),
        (lambda: text_with_heads(_bert_tiny(), ["classifier"], num_labels=3), r"heads \['pooler', 'classifier'\]"),
        (lambda: text_with_heads(_bert_tiny(), ["pooler", "mlm"]), r"heads \['pooler', 'mlm'\]"),
        (lambda: mmlm.create_model("gpt2-tiny", eot_token_id=None), "eot_token_id=None"),
    ],
    ids=["clip-text-tower", "pre-ln-bert", "vit-without-class-token", "bert-classifier", "mlm-pooler", "gpt2-no-eot"],
)
def test_what_transformers_cannot_express_is_refused(make, match, tmp_path):
    with pytest.raises(ConversionError, match=match):
        export(make(), tmp_path / "hf", "hf")
    assert list(tmp_path.iterdir()) == []  # no folder, not even a partial one

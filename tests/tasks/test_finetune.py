"""Fine-tuning tasks: one mmlm model per task, checkpoints that load without the task,
predictions, and scores that do not depend on how the data was split into batches or ranks."""

import os
import socket
from pathlib import Path

import lightning as L
import pytest
import torch

import mmlm
from mmlm.data import (
    ImageClassificationDataModule,
    QuestionAnsweringDataModule,
    TextClassificationDataModule,
    TokenClassificationDataModule,
)
from mmlm.data.text_datasets import extract_answers, read_conll
from mmlm.export.convert import convert
from mmlm.paths import ASSETS
from mmlm.tasks import ImageClassification, QuestionAnswering, TextClassification, TokenClassification

DATA = ASSETS / "finetune"
TOKENIZER = str(ASSETS / "tokenizer")
BERT = {"model": "bert-tiny", "model_overrides": {"vocab_size": 4016, "context_length": 128}}
TEXT_DATA = {"tokenizer": TOKENIZER, "max_length": 128, "num_workers": 0}

# per task: a tiny task as the configs/finetune/*-tiny.yaml build it, and its data module for a batch size
CASES = {
    "image": (
        lambda: ImageClassification("vit-tiny", num_classes=10),
        lambda bs: ImageClassificationDataModule("digits", "digits", "digits", preset="vit-tiny", batch_size=bs,
                                                 num_workers=0),
    ),
    "text": (
        lambda: TextClassification(**BERT, num_classes=4),
        lambda bs: TextClassificationDataModule(*(str(DATA / f"topics_{s}.csv") for s in ("train", "val", "val")),
                                                batch_size=bs, **TEXT_DATA),
    ),
    "token": (
        lambda: TokenClassification(**BERT, num_classes=3),
        lambda bs: TokenClassificationDataModule(*(str(DATA / f"code_spans_{s}.conll") for s in ("train", "val", "val")),
                                                 batch_size=bs, **TEXT_DATA),
    ),
    "qa": (
        lambda: QuestionAnswering("bert-tiny", model_overrides={"vocab_size": 4016, "context_length": 192}),
        lambda bs: QuestionAnsweringDataModule(*(str(DATA / f"squad_{s}.json") for s in ("train", "val", "val")),
                                               tokenizer=TOKENIZER, max_length=192, doc_stride=32, batch_size=bs,
                                               num_workers=0),
    ),
}  # fmt: skip


def trainer(tmp_path: Path, **kw) -> L.Trainer:
    kw = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
          "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": tmp_path, **kw}  # fmt: skip
    return L.Trainer(**kw)


def model_inputs(batch: dict) -> tuple:
    if "image" in batch:
        return (batch["image"],)
    return batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")


def head_outputs(out) -> list[torch.Tensor]:
    """What a loaded model gives: the ViT's logits, or the named head outputs of a TextWithHeads."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [out["logits"]] if "logits" in out else [out["start_logits"], out["end_logits"]]


@pytest.mark.parametrize("name", CASES)
def test_a_fine_tuned_checkpoint_is_one_mmlm_model(name, tmp_path):
    torch.manual_seed(0)
    make_task, make_data = CASES[name]
    task, dm = make_task(), make_data(4)
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    fit = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    fit.fit(task, dm)
    fit.save_checkpoint(tmp_path / "run.ckpt")
    trained = task.model.state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in before)  # the step changed the weights

    model = mmlm.load_pretrained(tmp_path / "run.ckpt")
    assert type(model) is type(task.model) and model.state_dict().keys() == trained.keys()
    batch = next(iter(dm.val_dataloader()))
    task.eval()
    with torch.no_grad():
        expected = task(*model_inputs(batch))
        got = head_outputs(model(*model_inputs(batch)))
    for e, g in zip(expected if isinstance(expected, tuple) else (expected,), got, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)

    folder = convert(tmp_path / "run.ckpt", tmp_path / "converted")
    for key, value in mmlm.load(folder).state_dict().items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0)
    # and as transformers' class for it (ViT / BERT For{Image,Sequence,Token}Classification, ForQuestionAnswering)
    hf = mmlm.load_pretrained(convert(tmp_path / "run.ckpt", tmp_path / "hf", "hf"))
    assert hf.cfg == task.model.cfg and hf.state_dict().keys() == trained.keys()
    for key, value in hf.state_dict().items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0)

    bare = mmlm.load_pretrained(tmp_path / "run.ckpt", with_heads=False)
    encoder = task.model if name == "image" else task.model.encoder
    assert isinstance(bare, mmlm.VisionTransformer if name == "image" else mmlm.TextEncoder)
    own = {k: v for k, v in encoder.state_dict().items() if not k.startswith("head.")}
    assert bare.state_dict().keys() == own.keys()
    assert all(torch.equal(bare.state_dict()[k], v) for k, v in own.items())


def test_text_classifiers_read_bert_pooler_or_the_causal_towers_own_pooling():
    """BERT classifies dense + tanh on [CLS] as BertForSequenceClassification does; GPT-2 / CLIP text their token."""
    assert TextClassification("bert-tiny", num_classes=2).model.cfg.heads == ("pooler", "classifier")
    for causal in ("gpt2-tiny", "clip-tiny"):
        assert TextClassification(causal, num_classes=2).model.cfg.heads == ("classifier",)


def test_linear_probe_trains_the_head_alone(tmp_path):
    torch.manual_seed(0)
    task = TextClassification(**BERT, num_classes=4, linear_probe=True)
    task.train()
    assert not task.model.encoder.training and task.model.classifier.training and task.model.dropout.training
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(task, CASES["text"][1](8))
    changed = {k for k, v in task.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"classifier.weight", "classifier.bias"}


class GoldLogits(torch.nn.Module):
    """A stand-in model whose logits point at the batch's gold labels: predictions must read back the data."""

    def __init__(self, head: str, num_labels: int = 3):
        super().__init__()
        self.head, self.num_labels, self.batch = head, num_labels, None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        b, one_hot = self.batch, torch.nn.functional.one_hot
        if self.head == "qa":
            T = input_ids.shape[1]
            return {"start_logits": one_hot(b["start_positions"], T).float(),
                    "end_logits": one_hot(b["end_positions"], T).float()}  # fmt: skip
        return {"logits": one_hot(b["labels"].clamp(min=0), self.num_labels).float()}


def predict_with_gold_logits(name: str, batch_size: int, batches: int, tmp_path) -> tuple[list[dict], object]:
    task, dm = CASES[name][0](), CASES[name][1](batch_size)
    task.model = stub = GoldLogits(name)
    task.on_predict_batch_start = lambda batch, batch_idx, dataloader_idx=0: setattr(stub, "batch", batch)
    return trainer(tmp_path, limit_predict_batches=batches).predict(task, dm), dm


def test_token_classification_predicts_tag_names_per_word(tmp_path):
    outputs, _ = predict_with_gold_logits("token", 4, 2, tmp_path)
    tags = [sentence for out in outputs for sentence in out["tags"]]
    assert tags == [t for _, t in read_conll(DATA / "code_spans_val.conll")[:8]]


def test_qa_predicts_the_answer_text(tmp_path):
    outputs, dm = predict_with_gold_logits("qa", 16, 2, tmp_path)
    examples = {e["id"]: e for e in dm.datasets["test"].examples}
    answered = [(i, a) for out in outputs for i, a in zip(out["id"], out["answer"]) if a]
    assert len(answered) >= 5
    for i, answer in answered:  # gold positions in, the annotated answer text out
        assert answer == examples[i]["answers"][0]["text"]


def test_an_example_split_across_batches_gets_its_best_window():
    contexts = ["the quick brown fox jumps over the lazy dog"]
    # three windows of one example, each offering a different span; the middle one scores best
    offsets = torch.tensor([[[0, 3], [4, 9], [10, 15]], [[16, 19], [20, 25], [26, 30]], [[31, 34], [35, 39], [40, 43]]])
    start = torch.tensor([[5.0, 0, 0], [0, 9.0, 0], [0, 0, 7.0]])
    end = torch.tensor([[5.0, 0, 0], [0, 9.0, 0], [0, 0, 7.0]])
    index = torch.zeros(3, dtype=torch.long)
    whole = extract_answers(start, end, offsets, index, contexts)
    first = extract_answers(start[:1], end[:1], offsets[:1], index[:1], contexts)
    split = extract_answers(start[1:], end[1:], offsets[1:], index[1:], contexts, best=first)
    assert whole == split == {0: (18.0, "jumps")}
    # the other order: a worse window seen later does not replace the best one
    later = extract_answers(start[:2], end[:2], offsets[:2], index[:2], contexts)
    assert extract_answers(start[2:], end[2:], offsets[2:], index[2:], contexts, best=later) == whole


def validate(task, dm, tmp_path, **kw) -> dict[str, float]:
    (metrics,) = trainer(tmp_path, limit_val_batches=2, **kw).validate(task, dm, verbose=False)
    return metrics


SCORES = {"token": ("val/entity_f1", "val/entity_precision", "val/entity_recall"), "qa": ("val/exact_match", "val/f1")}


def validate_on_two_ranks(rank: int, tasks: dict, port: int, out: Path) -> None:
    """One of 2 gloo processes; both tasks are validated in one spawn, which is the slow part."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))  # fmt: skip
    scores = {name: validate(task, CASES[name][1](8), out, strategy="ddp", devices=2) for name, task in tasks.items()}
    if rank == 0:
        torch.save(scores, out / "two_ranks.pt")


@pytest.mark.processes
@pytest.mark.slow
def test_validation_scores_with_two_processes_equal_one(tmp_path):
    torch.manual_seed(0)
    tasks = {name: CASES[name][0]() for name in SCORES}
    # 2 batches of 16 on one process = 2 batches of 8 on each of 2 ranks: the same samples
    one = {name: validate(task, CASES[name][1](16), tmp_path) for name, task in tasks.items()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(validate_on_two_ranks, args=(tasks, port, tmp_path), nprocs=2)
    two = torch.load(tmp_path / "two_ranks.pt")
    for name, keys in SCORES.items():
        assert any(one[name][k] > 0 for k in keys), name  # a score that is not trivially zero
        for k in keys:
            assert two[name][k] == pytest.approx(one[name][k], abs=1e-6), (name, k)

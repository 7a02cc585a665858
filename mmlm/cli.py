"""The ``mmlm`` command: thin wrappers on typed functions (jsonargparse reads the signatures).

    mmlm fit|validate|test|predict --config FILE   LightningCLI: model and data are class_path choices
    mmlm convert SRC DST [--to TARGET]             any checkpoint load_pretrained reads -> mmlm / hf / open_clip / timm / sentence_transformers / onnx
    mmlm tokenizer train FILE [FILE ...] --vocab_size N --out DIR
    mmlm zeroshot MODEL --dataset DATA             zero-shot classification, CLIP_benchmark JSON + confusion PNG
    mmlm caption MODEL IMAGE [IMAGE ...]           captions from a CoCa (greedy, beam search or sampling)
    mmlm eval-retrieval MODEL --dataset DATA       image<->text recall@k in bounded memory
    mmlm index build|add|sync|info ...             embed images (+ captions) into FAISS indexes, metadata in SQLite
    mmlm serve DIR [DIR ...]                       the retrieval API (+ clip-retrieval's routes) and a web page
    mmlm search URL "text"                         query a running server: the nearest items
    mmlm quantize MODEL --out DIR                  int8 copy of a model (dynamic int8 Linear layers, CPU)
    mmlm prune MODEL --keep 0.5 --out DIR          smaller dense CLIP: heads, MLP units, channels by calibration
    mmlm explain MODEL IMAGE "text" [...]          heatmaps of where a CLIP finds each text; --text: token attributions
    mmlm clip-benchmark eval --model_type mmlm ... CLIP_benchmark's own command line, with mmlm's models registered
    mmlm demo                                      encode the bundled images and captions, print similarities
    mmlm presets                                   list the model presets

Options take dashes or underscores (``--vocab-size`` = ``--vocab_size``). A mistake in what was
typed or pointed at prints one line and exits with 2; ``--debug`` (or ``MMLM_DEBUG=1``) shows the
traceback instead. Heavy libraries (torch, Lightning, transformers) load only inside the commands,
so ``mmlm --help`` answers at once.
"""

from __future__ import annotations

import csv
import inspect
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

if TYPE_CHECKING:  # jsonargparse runs this block to read the annotations: keep torch out of it
    from jsonargparse import ArgumentParser

from mmlm.caption import caption
from mmlm.compress.commands import prune, quantize
from mmlm.explain.command import explain
from mmlm.paths import ASSETS, resolve
from mmlm.retrieval.commands import index_add, index_build, index_info, index_sync
from mmlm.retrieval.serve import search
from mmlm.serve.command import serve

DEBUG_FLAG = "--debug"


def presets() -> None:
    """List the model presets with their type and shape."""
    from mmlm.config import PRESETS, from_name

    for name in sorted(PRESETS):
        cfg = from_name(name)
        towers = [cfg.vision, cfg.text] if cfg.model_type == "clip" else [cfg]
        shape = " + ".join(f"{t.model_type} {t.width}x{t.depth}" for t in towers)
        print(f"{name:20s} {cfg.model_type:7s} {shape}  {(PRESETS[name].__doc__ or '').strip()}")


def demo(
    preset: str = "clip-tiny",
    manifest: Path = ASSETS / "captions.csv",
    checkpoint: str | None = None,
    seed: int = 0,
) -> Any:
    """Encode the bundled photographs and one caption each; print the image-text cosine similarities.

    Returns the (images, captions) similarity tensor.

    Args:
        preset: model preset to build (random weights) when no checkpoint is given.
        manifest: CSV with ``filepath`` and ``title`` columns (paths relative to the CSV).
        checkpoint: the CLIP to use instead of ``preset``: a preset name, an mmlm folder, a ``mmlm fit`` .ckpt,
            or any checkpoint ``mmlm.load_pretrained`` reads.
        seed: seed for the random initialisation.
    """
    import torch
    from PIL import Image

    from mmlm.factory import load

    spec = checkpoint or preset
    loaded = load(spec, seed=seed, image_text="the demo")
    model, transform = loaded.model, loaded.transform
    manifest = resolve(manifest)
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    first: dict[str, str] = {}
    for row in rows:  # one caption per image: the first listed
        first.setdefault(row["filepath"], row["title"])
    paths, captions = list(first), list(first.values())

    images = torch.stack([transform(Image.open(manifest.parent / p).convert("RGB")) for p in paths])
    tokens = loaded.require_tokenizer()(captions)
    with torch.no_grad():
        sim = model.encode_image(images) @ model.encode_text(tokens["input_ids"], tokens["attention_mask"]).T

    names = [Path(p).stem[:10] for p in paths]
    print(f"{model.cfg.__class__.__name__} '{spec}': {sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"cosine similarity, {len(paths)} images (rows) x {len(captions)} captions (columns)")
    print(" " * 11 + " ".join(f"{i:>5d}" for i in range(len(captions))))
    for name, row in zip(names, sim):
        print(f"{name:>10s} " + " ".join(f"{v:5.2f}" for v in row.tolist()))
    for i, c in enumerate(captions):
        print(f"  caption {i:2d}: {c}")
    accuracy = (sim.argmax(1) == torch.arange(len(paths))).float().mean().item()
    print(f"image->caption top-1: {accuracy:.1%} (chance {1 / len(paths):.1%})")
    return sim


def convert(
    src: Path,
    dst: Path,
    to: Literal["mmlm", "hf", "open_clip", "timm", "sentence_transformers", "onnx"] = "mmlm",
    tokenizer: str | None = None,
    act: Literal["gelu", "quick_gelu"] | None = None,
    overwrite: bool = False,
    int8: bool = False,
) -> None:
    """Convert a checkpoint (HF, OpenAI / OpenCLIP, timm, sentence-transformers, `mmlm fit` .ckpt) to any target.

    Args:
        src: checkpoint file or folder.
        dst: output folder; new or empty unless ``--overwrite``.
        to: ``mmlm`` (safetensors + config.json), ``hf`` (a transformers folder with tokenizer and
            preprocessor), ``open_clip`` (``local-dir:DST``), ``timm`` (safetensors + pretrained
            config), ``sentence_transformers`` (a ``SentenceTransformer(DST)`` folder) or ``onnx`` (image.onnx
            + text.onnx, tokenizer.json, preprocess.json: ONNX Runtime in any language, no torch).
        tokenizer: the model's tokenizer folder (or ``clip``) when none is beside ``src``.
        act: MLP activation of an OpenAI / OpenCLIP file when it cannot be detected (``quick_gelu`` or ``gelu``).
        overwrite: replace ``dst`` if it is a folder mmlm wrote for the same target (any other is refused).
        int8: ``--to onnx`` only: int8 graphs (ONNX Runtime's dynamic quantization).
    """
    from mmlm.export.convert import convert as run

    print(f"wrote {run(src, dst, to, overwrite=overwrite, tokenizer=tokenizer, act=act, int8=int8)}")


def train_tokenizer(
    files: list[Path],
    vocab_size: int = 8000,
    out: Path = Path("tokenizer"),
    kind: Literal["wordpiece", "bpe"] = "wordpiece",
    overwrite: bool = False,
) -> None:
    """Train a WordPiece (BERT) or byte-level BPE (GPT-2) tokenizer and save it as a tokenizer.json folder.

    Args:
        files: plain-text files, one or more (typed one after the other: ``a.txt b.txt``).
        vocab_size: target vocabulary size, special tokens included.
        out: output folder (loads with ``mmlm.get_tokenizer(out)`` or transformers' ``AutoTokenizer``).
        kind: ``wordpiece`` or ``bpe``.
        overwrite: replace ``out`` if it is a tokenizer folder this command wrote (any other is refused).
    """
    from mmlm.data import train_tokenizer as train

    tok = train(files, vocab_size, out, kind, overwrite=overwrite)
    print(f"{kind} tokenizer with {tok.vocab_size} tokens written to {out}")


def zeroshot(
    model: str,
    dataset: str = "digits",
    classnames: Path | None = None,
    templates: str | None = None,
    split: str = "test",
    output: Path | None = None,
    confusion_matrix: Path | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "cpu",
    act: Literal["gelu", "quick_gelu"] | None = None,
    tokenizer: str | None = None,
    image_key: str = "filepath",
    label_key: str = "label",
    language: str = "en",
    seed: int = 0,
    int8: bool = False,
    overwrite: bool = False,
) -> dict:
    """Zero-shot classification: acc1, acc5, mean per-class recall, printed as CLIP_benchmark's result JSON.

    Args:
        model: the CLIP: a preset name, an mmlm folder, a ``mmlm fit`` .ckpt, or any checkpoint
            ``mmlm.load_pretrained`` reads (a preset has random weights, for smoke tests).
        dataset: ``digits``, an ImageFolder, a CSV / TSV / JSONL manifest, WebDataset shards
            (``data/{0..9}.tar``, image + ``cls``) or a CLIP_benchmark ``wds`` folder.
        classnames: file with one class name per line, in label order; default: the dataset's.
        templates: ``simple``, ``openai`` (the 80 CLIP ImageNet prompts), ``digits``, or a file with one
            template per line (``{}`` or ``{c}`` marks the class); default: the dataset's own, else ``openai``.
        split: ``train`` or ``test`` for digits and CLIP_benchmark folders.
        output: write the result JSON here too.
        confusion_matrix: write the confusion matrix here (PNG).
        batch_size: images per forward pass.
        num_workers: DataLoader workers reading images.
        device: ``cpu``, ``cuda``, ``cuda:1``, ...
        act: MLP activation of an OpenAI / OpenCLIP state dict when it cannot be detected.
        tokenizer: tokenizer name or folder; default: the checkpoint's, else the CLIP BPE.
        image_key: manifest column with the image path.
        label_key: manifest column with the label (class name or integer).
        language: the ``language`` field of the result.
        seed: seed of a preset's random weights.
        int8: quantize the model's Linear layers to int8 on the fly (CPU; ``mmlm quantize`` saves such a model).
        overwrite: replace ``output`` / ``confusion_matrix`` if they exist (else they are refused).
    """
    from mmlm import outputs

    for path in (output, confusion_matrix):
        if path is not None:
            outputs.check_file(path, overwrite)  # before the model is loaded
    from mmlm.data.eval_datasets import classification_data
    from mmlm.errors import check_at_least
    from mmlm.eval import results
    from mmlm.eval.zeroshot import (
        OPENAI_IMAGENET_TEMPLATES,
        load_classnames,
        load_templates,
        save_confusion_matrix,
        zero_shot_classify,
    )

    check_at_least(1, batch_size=batch_size)
    check_at_least(0, num_workers=num_workers)
    from mmlm.factory import load

    loaded = load(model, tokenizer=tokenizer, act=act, device=device, seed=seed, int8=int8,
                  image_text="zero-shot evaluation")  # fmt: skip
    net, tok = loaded.model, loaded.require_tokenizer()
    names = load_classnames(classnames) if classnames is not None else None
    data = classification_data(dataset, loaded.transform, split, names, image_key, label_key)
    if not data.classes:
        raise ValueError(f"{dataset} does not name its classes: give --classnames")
    prompts = load_templates(templates) if templates else data.templates or list(OPENAI_IMAGENET_TEMPLATES)
    loader = data.loader(batch_size, num_workers)
    metrics, logits, labels = zero_shot_classify(net, tok, loader, data.classes, prompts, device)
    if confusion_matrix is not None:
        save_confusion_matrix(labels, logits.argmax(1), data.classes, confusion_matrix, overwrite=overwrite)
    described = results.describe_model(model, seed)
    samples = results.sample_counts(loader)
    result = results.benchmark_result(dataset, *described, "zeroshot_classification", metrics, language, samples)
    results.write_result(result, output, overwrite)
    return result


def eval_retrieval(
    model: str,
    dataset: str = "digits",
    split: str = "test",
    output: Path | None = None,
    ks: list[int] = [1, 5, 10],  # noqa: B006 (jsonargparse reads the default; never mutated)
    batch_size: int = 64,
    chunk_size: int = 1024,
    num_workers: int = 0,
    device: str = "cpu",
    act: Literal["gelu", "quick_gelu"] | None = None,
    tokenizer: str | None = None,
    image_key: str = "filepath",
    caption_key: str | None = None,
    language: str = "en",
    seed: int = 0,
    int8: bool = False,
    overwrite: bool = False,
) -> dict:
    """Image-text retrieval: recall@k, mean and median rank both ways, as CLIP_benchmark's result JSON.

    Several captions per image count an image query as a hit when any of its captions is in the
    top k. Scores are computed ``chunk_size`` query rows at a time, never as the full matrix.

    Args:
        model: the CLIP: a preset name, an mmlm folder, a ``mmlm fit`` .ckpt, or any checkpoint
            ``mmlm.load_pretrained`` reads (a preset has random weights, for smoke tests).
        dataset: ``digits``, a CSV / TSV / JSONL manifest (one row per caption; repeat the image path
            for more captions), WebDataset shards (image + ``txt`` lines or ``json`` captions) or a
            CLIP_benchmark ``wds`` folder.
        split: ``train`` or ``test`` for digits and CLIP_benchmark folders.
        output: write the result JSON here too.
        ks: the k of recall@k.
        batch_size: images per forward pass.
        chunk_size: query rows scored at a time (memory: chunk_size x max(images, texts) floats).
        num_workers: DataLoader workers reading images.
        device: ``cpu``, ``cuda``, ...
        act: MLP activation of an OpenAI / OpenCLIP state dict when it cannot be detected.
        tokenizer: tokenizer name or folder; default: the checkpoint's, else the CLIP BPE.
        image_key: manifest column with the image path.
        caption_key: manifest column (default ``title``) or shard json field (default ``caption``).
        language: the ``language`` field of the result.
        seed: seed of a preset's random weights.
        int8: quantize the model's Linear layers to int8 on the fly (CPU).
        overwrite: replace ``output`` if it exists (else it is refused).
    """
    from mmlm import outputs
    from mmlm.errors import check_at_least
    from mmlm.eval.retrieval import check_retrieval_args, evaluate_retrieval

    check_retrieval_args(ks, chunk_size)  # before the slow imports and the model
    check_at_least(1, batch_size=batch_size)
    check_at_least(0, num_workers=num_workers)
    if output is not None:
        outputs.check_file(output, overwrite)
    from mmlm.data.eval_datasets import retrieval_data
    from mmlm.eval import results
    from mmlm.factory import load

    loaded = load(model, tokenizer=tokenizer, act=act, device=device, seed=seed, int8=int8,
                  image_text="zero-shot evaluation")  # fmt: skip
    net, tok = loaded.model, loaded.require_tokenizer()
    data = retrieval_data(dataset, loaded.transform, split, image_key, caption_key)
    loader = data.loader(batch_size, num_workers)
    metrics = evaluate_retrieval(net, tok, loader, device, tuple(ks), chunk_size)
    described = results.describe_model(model, seed)
    samples = results.sample_counts(loader)
    result = results.benchmark_result(dataset, *described, "zeroshot_retrieval", metrics, language, samples)
    results.write_result(result, output, overwrite)
    return result


LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
CLIP_BENCHMARK = "clip-benchmark"  # its arguments go to CLIP_benchmark's own parser untouched


def lightning_cli(args: list[str] | None = None, run: bool = True):
    """LightningCLI over every mmlm task and data module (``class_path`` in the YAML).

    Each command writes into its own folder under ``trainer.default_root_dir`` (``mmlm.runs``):
    ``mmlm fit`` into a new ``version_N``, ``--ckpt_path last`` continues the newest one.
    """
    from mmlm.runs import RunCLI

    return RunCLI(args, run)


# mmlm's own commands; a dict is a command with subcommands
COMMANDS: dict[str, Any] = {
    "convert": convert,
    "demo": demo,
    "presets": presets,
    "tokenizer": {"train": train_tokenizer},
    "zeroshot": zeroshot,
    "caption": caption,
    "eval-retrieval": eval_retrieval,
    "quantize": quantize,
    "prune": prune,
    "index": {"build": index_build, "add": index_add, "sync": index_sync, "info": index_info},
    "serve": serve,
    "search": search,
    "explain": explain,
}
# what a positional that takes one or more values is called, per command; jsonargparse reads a
# list[Path] positional given one path as a file *listing* paths, so these get nargs="+" instead
VARIADIC = {train_tokenizer: "files", serve: "indexes", explain: "inputs", caption: "inputs"}


def build_parser(only: str | None = None) -> ArgumentParser:
    """The parser of every command, Lightning's included (listed only: ``main`` hands those to LightningCLI);
    ``only``: of that command alone, when the command line names it (a second of a 2-core CPU's time is
    reading every command's signature and docstring, which ``mmlm serve``'s start would otherwise wait for)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="mmlm", description="Train, convert and evaluate vision-language models built on one shared block.",
        exit_on_error=False,  # every parser raises what it refuses: `main` prints one line, not the usage block
        epilog=f"`mmlm COMMAND --help` lists a command's options; they take dashes or underscores (--vocab-size). "
        f"Errors print one line; add {DEBUG_FLAG} or set MMLM_DEBUG=1 for the traceback.",
    )  # fmt: skip
    subcommands = parser.add_subcommands(required=True)
    if only in COMMANDS:
        _add_commands(subcommands, {only: COMMANDS[only]})
        return parser
    for name in LIGHTNING_COMMANDS:
        text = f"Lightning {name}: task, data and trainer from --config FILE (`mmlm {name} --help` lists the options)"
        subcommands.add_subcommand(name, ArgumentParser(exit_on_error=False, description=text), help=text)
    text = "CLIP_benchmark's command line (`clip_benchmark eval ...`) with model_type `mmlm` registered"
    subcommands.add_subcommand(CLIP_BENCHMARK, ArgumentParser(exit_on_error=False, description=text), help=text)
    _add_commands(subcommands, COMMANDS)
    return parser


def _add_commands(subcommands: Any, commands: dict[str, Any]) -> None:
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

    for name, target in commands.items():
        if isinstance(target, dict):  # jsonargparse wants a level added before the one below it
            sub = ArgumentParser(exit_on_error=False, description=f"{name} commands")
            subcommands.add_subcommand(name, sub, help=f"{name} commands: {', '.join(target)}")
            _add_commands(sub.add_subcommands(required=True), target)
            continue
        sub = ArgumentParser(exit_on_error=False, description=_summary(target))
        sub.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of the options below")
        own = {VARIADIC[target]} if target in VARIADIC else set()
        for arg in own:
            words = inspect.signature(target).parameters[arg].annotation in ("list[str]", list[str])
            sub.add_argument(arg, nargs="+", type=str if words else Path, help=_param_doc(target, arg))
        for param in inspect.signature(target).parameters.values():
            if param.annotation in (bool, "bool"):  # a flag: `--overwrite` alone, or `--overwrite false`
                sub.add_argument(f"--{param.name}", action=ActionYesNo, nargs="?", default=param.default,
                                 help=_param_doc(target, param.name))  # fmt: skip
                own.add(param.name)
        sub.add_function_arguments(target, as_group=False, as_positional=True, skip=own)
        subcommands.add_subcommand(name, sub, help=_summary(target))


def _summary(obj: Any) -> str:
    return (inspect.getdoc(obj) or "").strip().splitlines()[0]


def _param_doc(fn: Callable, name: str) -> str:
    from docstring_parser import parse

    return next(p.description for p in parse(inspect.getdoc(fn) or "").params if p.arg_name == name)


def run_command(args: list[str]) -> Any:
    """Parse ``args`` with ``build_parser`` and call the chosen command with what was parsed."""
    cfg = build_parser(args[0] if args else None).parse_args(args)
    target: Any = COMMANDS
    while isinstance(target, dict):  # walk down nested subcommands
        target, cfg = target[cfg.subcommand], cfg[cfg.subcommand]
    kwargs = {k: v for k, v in vars(cfg).items() if k != "config"}
    return target(**kwargs)


def underscore_options(args: list[str]) -> list[str]:
    """``--vocab-size 8000`` -> ``--vocab_size 8000``, ``--trainer.max-steps`` -> ``--trainer.max_steps``:
    options are Python parameter names, and people type dashes."""
    out = []
    for i, arg in enumerate(args):
        if arg == "--":  # everything after it is a value
            return out + args[i:]
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            arg = "--" + name[2:].replace("-", "_") + eq + value
        out.append(arg)
    return out


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean a mistake in what was typed or pointed at, not a bug in mmlm.

    ValueError covers ConversionError, UsageError and json.JSONDecodeError; OSError covers
    FileNotFoundError and FileExistsError. A TypeError or KeyError is a bug in mmlm and keeps its
    traceback: code that refuses what a user named raises ValueError (``mmlm.errors.UsageError``).
    """
    from argparse import ArgumentError

    from safetensors import SafetensorError

    errors: tuple[type[BaseException], ...] = (ValueError, OSError, ArgumentError, SafetensorError)
    lightning = sys.modules.get("lightning.fabric.utilities.exceptions")  # imported only when a Lightning command ran
    return errors + ((lightning.MisconfigurationException,) if lightning else ())


def one_line(error: BaseException) -> str:
    """The error's message on one line."""
    from argparse import ArgumentError

    if isinstance(error, ArgumentError):
        return parse_error(str(error))
    return " ".join(str(error).split()) or type(error).__name__


def parse_error(message: str) -> str:
    """jsonargparse's many-line refusal of a value, as ``--k abc: expected int``: the option, the value
    as typed, and what it takes (a Literal's choices, a type's name)."""
    found = re.match(r'Parser key "([^"]+)":\s*(.*)', message, re.S)
    if found is None:
        flat = " ".join(message.split())
        return flat if len(flat) <= 300 else flat[:300] + " ..."  # `--config` of a non-YAML file echoes it whole
    key, detail = found.groups()
    value = re.findall(r"(?:Got value|Given value): (.*)", detail)
    wanted = []
    for name in re.findall(r"Expected a (.+?)(?:\. Got value:.*)?$", detail, re.M):
        choices = re.fullmatch(r"typing\.Literal\[(.*)\]", name)
        if choices:  # typing.Literal['a', 'b'] -> one of a, b
            name = "one of " + choices.group(1).replace("'", "")
        else:  # <class 'int'> -> int
            name = re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", name)
        if name != "NoneType" and name not in wanted:
            wanted.append(name)
    typed = f" {value[-1]}" if value else ""
    nested = re.fullmatch(r"NestedArg\(key='(.*)', val='(.*)'\)", value[-1]) if value else None
    if nested:  # `--model.init_args.nope 3`: jsonargparse names the class_path option and repeats the rest as a repr
        key, typed = f"{key}.init_args.{nested.group(1)}", f" {nested.group(2)}"
    problem = re.search(r"Problem with given class_path '([^']+)':\s*(.+)", detail)
    if problem:
        return f"--{key}{typed}: {problem.group(2).strip()} (by {problem.group(1)})"
    reason = f"expected {' or '.join(wanted)}" if wanted else " ".join(detail.split())
    return f"--{key}{typed}: {reason}"


def _command_words(args: list[str]) -> str:
    """``tokenizer train`` of ``tokenizer train a.txt --out x``: the words naming the command."""
    words: list[str] = []
    level: Any = {**COMMANDS, **dict.fromkeys(LIGHTNING_COMMANDS)}
    for arg in args:
        if not isinstance(level, dict) or arg not in level:
            break
        words.append(arg)
        level = level[arg]
    return " ".join(words)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    cut = args.index("--") if "--" in args else len(args)
    debug = DEBUG_FLAG in args[:cut] or os.environ.get("MMLM_DEBUG", "0") not in ("", "0")
    args = [a for a in args[:cut] if a != DEBUG_FLAG] + args[cut:]
    benchmark = args[:1] == [CLIP_BENCHMARK]  # its options go to CLIP_benchmark's parser as typed
    args = args if benchmark else underscore_options(args)
    command = CLIP_BENCHMARK if benchmark else _command_words(args)
    try:
        if benchmark:
            from mmlm.eval.clip_benchmark import cli

            code = cli(args[1:])
            if code:
                raise SystemExit(code)
        elif command in LIGHTNING_COMMANDS:
            lightning_cli(args)
        else:
            run_command(args)
    except user_errors() as e:
        if debug:
            raise
        where = f"mmlm {command}".strip()
        print(f"{where}: error: {one_line(e)} (add {DEBUG_FLAG} for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

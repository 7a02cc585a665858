"""Tokenizers: one wrapper around HF ``tokenizers`` for every vocabulary mmlm uses.

- ``get_tokenizer("clip")`` (or a CLIP preset name): the OpenAI CLIP BPE, built from
  the vocabulary open_clip ships; ids equal ``open_clip.tokenize``.
- ``get_tokenizer(path)``: any HF tokenizer folder (``tokenizer.json`` +
  ``tokenizer_config.json``), e.g. one written by ``train_tokenizer``.
- ``train_tokenizer(files, vocab_size, out_dir, kind)``: WordPiece (BERT) or
  byte-level BPE (GPT-2) trained on text files, saved as a standard folder that
  ``transformers.AutoTokenizer`` also loads.

Calling a tokenizer pads to the longest text of the batch, never to the context.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import html
import importlib.util
import json
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from tokenizers import Encoding, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from mmlm.config import PRESETS
from mmlm.paths import resolve

ROLES = ("pad", "unk", "cls", "sep", "mask", "bos", "eos")
CLIP_NAMES = ("clip", "clip-bpe", "openai-clip")
CLIP_SOT, CLIP_EOT = "<start_of_text>", "<end_of_text>"
CLIP_VOCAB_SIZE = 49408  # OpenAI's BPE: 256 bytes x2, 48,894 merges, 2 specials
WORDPIECE_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
BPE_SPECIALS = {"eos": "<|endoftext|>", "pad": "<pad>", "mask": "<mask>"}


class Tokenizer:
    """Texts -> padded ``input_ids`` / ``attention_mask`` tensors, and back.

    Args:
        backend: the HF ``tokenizers.Tokenizer`` (normaliser, model, post-processor).
        context_length: truncate to this many tokens, special tokens included
            (the end-of-text token is kept, as open_clip does). None: no limit.
        special_tokens: role -> token string for the roles in ``ROLES``.
        pad_token_id: pad id when the vocabulary has no pad token (CLIP pads with 0).
        clean: text clean-up run in Python before the backend (CLIP's ftfy + html unescape).
    """

    def __init__(
        self,
        backend: Backend,
        context_length: int | None = None,
        special_tokens: dict[str, str] | None = None,
        pad_token_id: int | None = None,
        clean: Callable[[str], str] | None = None,
    ) -> None:
        self.backend = backend
        self.context_length = context_length
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if k in ROLES and v}
        self.clean = clean
        ids = {role: backend.token_to_id(tok) for role, tok in self.special_tokens.items()}
        self.unk_token_id: int | None = ids.get("unk")
        self.mask_token_id: int | None = ids.get("mask")
        self.cls_token_id: int | None = ids.get("cls")
        self.sep_token_id: int | None = ids.get("sep")
        self.bos_token_id: int | None = ids.get("bos", self.cls_token_id)
        self.eos_token_id: int | None = ids.get("eos", self.sep_token_id)
        pad = ids.get("pad", pad_token_id)
        self.pad_token_id: int = pad if pad is not None else (self.eos_token_id or 0)
        self.has_token_types = _pair_uses_type_ids(backend)
        self._truncation: int | None = -1  # what the backend is set to; -1 = not set yet

    # ---------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eot_token_id(self) -> int | None:
        """The end-of-text token (CLIP's pooled token, BERT's [SEP], GPT-2's <|endoftext|>)."""
        return self.eos_token_id

    @property
    def all_special_ids(self) -> list[int]:
        ids = {self.backend.token_to_id(t) for t in self.special_tokens.values()}
        return sorted(i for i in ids if i is not None)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    # ---------------------------------------------------------------- encoding
    def encode_batch(
        self,
        texts: Sequence[str] | Sequence[Sequence[str]],
        text_pair: Sequence[str] | None = None,
        context_length: int | None = None,
        add_special_tokens: bool = True,
        is_pretokenized: bool = False,
        truncate: bool = True,
    ) -> list[Encoding]:
        """Raw, unpadded ``tokenizers.Encoding``s (ids, offsets, word ids, ...).

        Truncated to ``context_length`` (default: the tokenizer's) unless ``truncate=False``.
        """
        self._set_truncation((context_length or self.context_length) if truncate else None)
        if self.clean is not None and not is_pretokenized:
            texts = [self.clean(t) for t in texts]
            text_pair = [self.clean(t) for t in text_pair] if text_pair is not None else None
        inputs: list[Any] = list(texts) if text_pair is None else list(zip(texts, text_pair))
        return self.backend.encode_batch(inputs, is_pretokenized=is_pretokenized, add_special_tokens=add_special_tokens)

    def encode(self, text: str, text_pair: str | None = None, add_special_tokens: bool = True) -> list[int]:
        pair = None if text_pair is None else [text_pair]
        return self.encode_batch([text], pair, add_special_tokens=add_special_tokens)[0].ids

    def __call__(
        self,
        texts: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        context_length: int | None = None,
        return_special_tokens_mask: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Tokenise a batch: ``input_ids`` and ``attention_mask`` (B, T), T = longest text.

        ``token_type_ids`` come too for a vocabulary with segments (BERT) or a pair.
        """
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(text_pair, str):
            text_pair = [text_pair]
        encodings = self.encode_batch(texts, text_pair, context_length)
        return self.pad(encodings, token_types=self.has_token_types or text_pair is not None,
                        special_tokens_mask=return_special_tokens_mask)  # fmt: skip

    def pad(
        self, encodings: Sequence[Encoding], token_types: bool = False, special_tokens_mask: bool = False
    ) -> dict[str, torch.Tensor]:
        """Stack encodings into (B, T) tensors padded with ``pad_token_id``."""
        if not encodings:
            raise ValueError("cannot tokenise an empty batch")
        length = max(len(e.ids) for e in encodings)
        out = {"input_ids": _stack([e.ids for e in encodings], length, self.pad_token_id)}
        out["attention_mask"] = _stack([[1] * len(e.ids) for e in encodings], length, 0)
        if token_types:
            out["token_type_ids"] = _stack([e.type_ids for e in encodings], length, 0)
        if special_tokens_mask:
            out["special_tokens_mask"] = _stack([e.special_tokens_mask for e in encodings], length, 1)
        return out

    # ---------------------------------------------------------------- decoding
    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens).strip()

    def batch_decode(
        self,
        ids: Sequence[Sequence[int]] | torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        skip_special_tokens: bool = True,
    ) -> list[str]:
        """Decode rows; give ``attention_mask`` when padding is a real token (CLIP pads with 0 = "!")."""
        if isinstance(ids, torch.Tensor):
            rows = (
                ids.tolist() if attention_mask is None else [r[m.bool()].tolist() for r, m in zip(ids, attention_mask)]
            )
        else:
            rows = [list(r) for r in ids]
        return [s.strip() for s in self.backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)]

    # ---------------------------------------------------------------- saving
    def save(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Write ``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` (and the
        slow tokenizers' vocabulary files) into ``out_dir``, e.g. beside a model's weights.

        A file of those names already there is refused unless ``overwrite`` (``mmlm.outputs``: never
        silently replaced). The folder loads with ``get_tokenizer(out_dir)`` and with
        ``transformers.AutoTokenizer.from_pretrained(out_dir)``.
        """
        import tempfile

        from mmlm import outputs

        out = Path(out_dir)
        with tempfile.TemporaryDirectory() as tmp:
            files = self._write(Path(tmp))
            for f in files:  # all refused before one is written
                outputs.check_file(out / f.name, overwrite)
            for f in files:
                outputs.write_file(out / f.name, f.read_bytes(), overwrite)
        return out

    def _write(self, out: Path) -> list[Path]:
        backend = Backend.from_str(self.backend.to_str())
        backend.no_truncation()
        backend.no_padding()
        backend.save(str(out / "tokenizer.json"))
        backend.model.save(str(out))  # vocab.txt (WordPiece) or vocab.json + merges.txt (BPE), for slow tokenizers
        specials = {f"{role}_token": tok for role, tok in self.special_tokens.items()}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": self.context_length or 1_000_000,
            "clean_up_tokenization_spaces": False,
            **specials,
        }
        if self.has_token_types:
            config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
        return sorted(out.iterdir())

    def __repr__(self) -> str:
        specials = self.special_tokens
        return f"Tokenizer(vocab_size={self.vocab_size}, context_length={self.context_length}, specials={specials})"

    def _set_truncation(self, length: int | None) -> None:
        if length == self._truncation:
            return
        if length is None:
            self.backend.no_truncation()
        else:
            self.backend.enable_truncation(length)
        self._truncation = length


def _stack(rows: Sequence[Sequence[int]], length: int, fill: int) -> torch.Tensor:
    out = torch.full((len(rows), length), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def _pair_uses_type_ids(backend: Backend) -> bool:
    """True when the post-processor gives the second segment type id 1 (BERT)."""
    post = json.loads(backend.to_str()).get("post_processor") or {}
    procs = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for p in procs:
        if p.get("type") == "BertProcessing":
            return True
        if p.get("type") == "TemplateProcessing":
            for piece in p.get("pair", []):
                if next(iter(piece.values())).get("type_id", 0) == 1:
                    return True
    return False


# ------------------------------------------------------------------------- loading


def get_tokenizer(name_or_path: str | Path, context_length: int | None = None) -> Tokenizer:
    """A tokenizer by name or folder; never downloads.

    Args:
        name_or_path: ``"clip"`` (also ``"clip-bpe"``, ``"openai-clip"`` or a CLIP
            preset name such as ``"clip-vit-b-32"``) for the CLIP BPE; otherwise a
            folder holding ``tokenizer.json`` (+ ``tokenizer_config.json``), a
            ``tokenizer.json`` file, or a folder ``transformers.AutoTokenizer`` can
            read offline (e.g. only ``vocab.txt``); ``package:NAME/...`` for a folder
            inside an installed package.
        context_length: truncation length, special tokens included. Default: 77 for
            CLIP, else ``model_max_length`` from ``tokenizer_config.json`` (if any).
    """
    name = str(name_or_path)
    if is_clip_name(name):
        return clip_tokenizer(context_length or 77)
    path = resolve(name)  # also "assets/tokenizer", the bundled one, from any working directory
    if path.is_file() and path.suffix == ".json":
        backend = Backend.from_file(str(path))
        return Tokenizer(backend, context_length, _guess_specials(backend))
    if not path.is_dir():
        raise FileNotFoundError(
            f"no tokenizer {name!r}: give 'clip', a CLIP preset name, or a local folder with tokenizer.json "
            "(nothing is downloaded)"
        )
    config = (
        json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").exists() else {}
    )
    if (path / "tokenizer.json").exists():
        backend = Backend.from_file(str(path / "tokenizer.json"))
    else:  # vocab.txt / sentencepiece folders: transformers converts them to a fast tokenizer
        from transformers import AutoTokenizer

        backend = AutoTokenizer.from_pretrained(str(path), local_files_only=True).backend_tokenizer
    specials = _guess_specials(backend)
    specials.update({r: t for r in ROLES if (t := _token_str(config.get(f"{r}_token")))})
    if context_length is None:
        max_len = config.get("model_max_length")
        context_length = int(max_len) if isinstance(max_len, (int, float)) and max_len < 100_000 else None
    # A folder keeps its own settings for the rest, so start from a clean slate.
    backend.no_padding()
    backend.no_truncation()
    return Tokenizer(backend, context_length, specials)


def _token_str(tok: Any) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def _guess_specials(backend: Backend) -> dict[str, str]:
    vocab = backend.get_vocab()
    guesses = {**WORDPIECE_SPECIALS, **BPE_SPECIALS, "bos": None}
    return {r: t for r, t in guesses.items() if t and t in vocab}


def is_clip_name(name: str) -> bool:
    """True for the names ``get_tokenizer`` reads as the CLIP BPE: ``clip`` and its aliases, CLIP preset names."""
    return name.lower() in CLIP_NAMES or _is_clip_preset(name)


def _is_clip_preset(name: str) -> bool:
    if name not in PRESETS:
        return False
    cfg = PRESETS[name]()
    text = getattr(cfg, "text", None)
    return text is not None and text.vocab_size == CLIP_VOCAB_SIZE


# ------------------------------------------------------------------------- CLIP BPE


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, in CLIP's vocabulary order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_vocab_path() -> Path:
    """open_clip's ``bpe_simple_vocab_16e6.txt.gz``, found without importing open_clip (slow)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the CLIP BPE vocabulary ships with open_clip_torch: pip install open_clip_torch")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


@functools.lru_cache(maxsize=1)
def _clip_backend_json() -> str:
    # open_clip keeps the first 49152 - 256 - 2 merges: 256 bytes x2 (with </w>) + merges + 2 specials = 49408
    lines = gzip.open(clip_vocab_path()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    chars = _bytes_to_unicode()
    vocab_list = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [CLIP_SOT, CLIP_EOT]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    tok = Backend(
        models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="", fuse_unk=False)
    )
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        # open_clip's split pattern, its special tokens first
        pre_tokenizers.Split(
            Regex(rf"{CLIP_SOT}|{CLIP_EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+"),
            behavior="removed", invert=True,
        ),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("</w>", " ")])
    tok.add_special_tokens([CLIP_SOT, CLIP_EOT])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_SOT} $A {CLIP_EOT}",
        pair=f"{CLIP_SOT} $A {CLIP_EOT} $B {CLIP_EOT}",
        special_tokens=[(CLIP_SOT, vocab[CLIP_SOT]), (CLIP_EOT, vocab[CLIP_EOT])],
    )
    return tok.to_str()


def _clip_clean(text: str) -> str:
    """open_clip's 'lower' clean-up minus the lower-casing, which the backend does."""
    import ftfy

    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split())


def clip_tokenizer(context_length: int = 77) -> Tokenizer:
    """The OpenAI CLIP BPE (49,408 tokens); pads with 0 like open_clip."""
    backend = Backend.from_str(_clip_backend_json())
    return Tokenizer(backend, context_length, {"bos": CLIP_SOT, "eos": CLIP_EOT}, pad_token_id=0, clean=_clip_clean)


# ------------------------------------------------------------------------- training


def train_tokenizer(
    files: Sequence[str | Path],
    vocab_size: int,
    out_dir: str | Path,
    kind: Literal["wordpiece", "bpe"] = "wordpiece",
    min_frequency: int = 2,
    lowercase: bool = True,
    context_length: int = 512,
    overwrite: bool = False,
) -> Tokenizer:
    """Train a tokenizer on text files and save it as a standard ``tokenizer.json`` folder.

    ``out_dir`` must be new or empty; ``overwrite`` replaces a tokenizer folder that ``train_tokenizer``
    wrote, nothing else (``mmlm.outputs``: never the tokenizer files of a model folder).

    Args:
        files: plain-text files to learn the vocabulary from.
        vocab_size: target vocabulary size, special tokens included (a small
            corpus may stop short of it).
        out_dir: folder to write; loads back with ``get_tokenizer(out_dir)``.
        kind: ``"wordpiece"``: BERT-style, lower-cased, ``[CLS] A [SEP] B [SEP]``
            with token types. ``"bpe"``: GPT-2-style byte-level BPE (lossless, no
            unknown tokens), each text ends with ``<|endoftext|>``.
        min_frequency: pairs seen fewer times are not merged.
        lowercase: WordPiece only; BPE keeps case.
        context_length: ``model_max_length`` written to the folder.
        overwrite: replace the tokenizer folder ``out_dir`` (refused for any other non-empty folder).
    """
    from mmlm import outputs

    if kind not in ("wordpiece", "bpe"):
        raise ValueError(f"kind must be 'wordpiece' or 'bpe', got {kind!r}")
    # a byte-level BPE always keeps its 256 byte tokens
    smallest = len(WORDPIECE_SPECIALS) + 1 if kind == "wordpiece" else len(BPE_SPECIALS) + 256
    if vocab_size < smallest:
        raise ValueError(f"vocab_size {vocab_size} is too small for {kind}: at least {smallest}, e.g. 8000")
    files = [str(resolve(f)) for f in files]  # `assets/corpus.txt` from any folder
    check_corpus(files)
    outputs.check(out_dir, "tokenizer", overwrite)  # before the training
    if kind == "wordpiece":
        specials = WORDPIECE_SPECIALS
        tok = Backend(models.WordPiece(unk_token=specials["unk"]))
        tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        # cleanup=False keeps decode the exact inverse of encode up to normalisation
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(specials.values())
        )
        tok.train(files, trainer)
        cls, sep = specials["cls"], specials["sep"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
        )
    elif kind == "bpe":
        specials = BPE_SPECIALS
        tok = Backend(models.BPE())
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(specials.values()),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )  # fmt: skip
        tok.train(files, trainer)
        eos = specials["eos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tok.token_to_id(eos))]
        )
    tokenizer = Tokenizer(tok, context_length, specials)
    with outputs.writing(out_dir, "tokenizer", overwrite) as folder:
        tokenizer.save(folder)
    return tokenizer


def check_corpus(files: Sequence[str | Path], chunk_size: int = 1 << 20) -> None:
    """Raise, naming the file, unless ``files`` are existing UTF-8 text files with some text in them.

    HF's trainer would otherwise panic on a binary file without naming it, and learn a
    vocabulary of special tokens alone from an empty corpus.
    """
    if not files:
        raise ValueError("no text files to train on")
    empty = True
    for path in map(Path, files):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such text file")
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0
        with open(path, "rb") as f:
            while chunk := f.read(chunk_size):
                try:
                    text = decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    where = offset + e.start
                    raise ValueError(f"{path} is not UTF-8 text (byte {where}): give plain-text files") from e
                if "\x00" in text:
                    raise ValueError(f"{path} holds NUL bytes, so it is binary, not text: give plain-text files")
                empty = empty and not text.strip()
                offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text (it ends inside a character): give plain-text files") from e
    if empty:
        raise ValueError(f"no text to train on: {', '.join(map(str, files))}: empty or only whitespace")

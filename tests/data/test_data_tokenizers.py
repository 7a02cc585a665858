import json
import time

import open_clip
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mmlm.data import get_tokenizer, train_tokenizer

CLIP_TEXTS = [
    "a photo of a cat",
    "A Photo Of A DOG!!",
    "It's 2024 &amp; we're   testing\ttabs and    spaces",
    "naïve café, déjà vu — “quotes”",
    "emoji 😀 and 日本語",
    "3.14159 is π, 42 is the answer",
    "don't won't I'll they've",
    " ".join(["a long caption that keeps going"] * 30),  # > 77 tokens: truncated, keeps end-of-text
]


def test_clip_bpe_equals_open_clip_tokenize():
    tok = get_tokenizer("clip")
    ours = tok(CLIP_TEXTS)
    ref = open_clip.tokenize(CLIP_TEXTS)  # (B, 77), zero-padded
    T = ours["input_ids"].shape[1]
    assert T == 77  # the long caption fills the context; nothing pads beyond the longest text
    torch.testing.assert_close(ours["input_ids"], ref[:, :T], rtol=0, atol=0)
    assert ours["input_ids"][-1, -1].item() == tok.eot_token_id == 49407
    assert tok.vocab_size == 49408 and tok.bos_token_id == 49406 and tok.pad_token_id == 0


def test_clip_pads_to_longest_text_only():
    tok = get_tokenizer("clip-vit-b-32")  # a CLIP preset name gives the CLIP BPE
    out = tok(["a cat", "a photo of a small dog"])
    ref = open_clip.tokenize(["a cat", "a photo of a small dog"])
    assert out["input_ids"].shape == (2, 8)  # sot + 6 tokens + eot
    torch.testing.assert_close(out["input_ids"], ref[:, :8], rtol=0, atol=0)
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1] * 8]
    assert tok.decode(out["input_ids"][1]) == "a photo of a small dog"


def test_clip_context_length_keeps_end_of_text():
    tok = get_tokenizer("clip", context_length=10)
    ids = tok([CLIP_TEXTS[-1]])["input_ids"]
    assert ids.shape == (1, 10)
    torch.testing.assert_close(ids, open_clip.tokenize([CLIP_TEXTS[-1]], context_length=10), rtol=0, atol=0)
    assert ids[0, -1].item() == 49407


def test_bundled_wordpiece_round_trips_corpus(assets, wordpiece):
    lines = [line for line in (assets / "corpus.txt").read_text().splitlines() if line.strip()][:300]
    backend = wordpiece.backend
    for line in lines:
        ids = wordpiece.encode(line)
        assert ids[0] == wordpiece.cls_token_id and ids[-1] == wordpiece.sep_token_id
        assert wordpiece.unk_token_id not in ids  # trained on this text: every character is known
        # normalised text: lower-cased, accents stripped, split into words and punctuation
        words = backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(line))
        assert wordpiece.decode(ids) == " ".join(w for w, _ in words)
    assert 3_500 <= wordpiece.vocab_size <= 8_000
    assert [wordpiece.pad_token_id, wordpiece.mask_token_id] == [0, 4]


def test_trained_folder_loads_in_transformers(assets, wordpiece):
    texts = ["The assert statement is a convenient way to insert debugging assertions.", "Short one."]
    hf = PreTrainedTokenizerFast(tokenizer_file=str(assets / "tokenizer" / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(str(assets / "tokenizer"))
    ours = wordpiece(texts)
    ref = auto(texts, padding=True, return_tensors="pt")
    torch.testing.assert_close(ours["input_ids"], ref["input_ids"], rtol=0, atol=0)
    torch.testing.assert_close(ours["attention_mask"], ref["attention_mask"], rtol=0, atol=0)
    assert hf(texts[0])["input_ids"] == wordpiece.encode(texts[0])
    assert auto.mask_token == "[MASK]" and auto.pad_token_id == 0


def test_train_bpe_is_lossless(tmp_path, assets):
    tok = train_tokenizer([assets / "corpus.txt"], 1000, tmp_path / "bpe", kind="bpe")
    text = "Mixed Case, unicode café ‘quotes’ and   three spaces.\nNew line."
    ids = tok.encode(text)
    assert ids[-1] == tok.eot_token_id == tok.token_to_id("<|endoftext|>")
    assert tok.decode(ids) == text.strip()
    again = get_tokenizer(tmp_path / "bpe")
    assert again.encode(text) == ids and again.vocab_size == tok.vocab_size == 1000
    config = json.loads((tmp_path / "bpe" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and config["mask_token"] == "<mask>"


def test_unknown_tokenizer_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        get_tokenizer("bert-base-uncased")


def test_command_trains_on_the_files_as_typed(tmp_path, assets, capsys):
    """`mmlm tokenizer train A B --vocab-size N --out DIR`: each path is a text file (jsonargparse would read a
    single list[Path] value as a file *listing* paths); the vocabulary learns words found only in B."""
    from mmlm.cli import main

    extra = tmp_path / "extra.txt"
    extra.write_text("zyxwvut zyxwvut zyxwvut qwertyuiop qwertyuiop qwertyuiop\n" * 20)
    start = time.perf_counter()
    main(["tokenizer", "train", str(assets / "corpus.txt"), str(extra), "--vocab-size", "2000",
          "--out", str(tmp_path / "tok")])  # fmt: skip
    elapsed = time.perf_counter() - start
    tok = get_tokenizer(tmp_path / "tok")
    assert tok.vocab_size == 2000
    assert tok.token_to_id("zyxwvut") is not None and tok.token_to_id("qwertyuiop") is not None
    assert "wordpiece tokenizer with 2000 tokens" in capsys.readouterr().out
    assert elapsed < 30, f"training on the 190 kB corpus took {elapsed:.1f} s"  # 0.1 s when files are read as files


@pytest.mark.parametrize(
    ("content", "vocab_size", "message"),
    [
        (b"", 8000, "empty or only whitespace"),
        (b"  \n\t\n", 8000, "empty or only whitespace"),
        (bytes(range(256)) * 8, 8000, "is not UTF-8 text"),
        (b"plain text\x00with a NUL", 8000, "binary"),
        (b"some words\n", 0, "vocab_size 0 is too small for wordpiece: at least 6"),
    ],
)
def test_bad_corpus_is_a_clear_error_naming_the_file(tmp_path, content, vocab_size, message):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        train_tokenizer([path], vocab_size, tmp_path / "tok")
    assert vocab_size == 0 or str(path) in str(error.value)
    assert not (tmp_path / "tok").exists()  # checked before anything is written


def test_bpe_vocabulary_smaller_than_its_bytes_is_refused(tmp_path, assets):
    with pytest.raises(ValueError, match="at least 259"):  # 256 byte tokens + 3 specials
        train_tokenizer([assets / "corpus.txt"], 100, tmp_path / "tok", kind="bpe")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer([assets / "corpus.txt", tmp_path / "missing.txt"], 1000, tmp_path / "tok")

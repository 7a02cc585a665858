"""Rebuild the small NLP fine-tuning sets in ``assets/finetune/`` from CPython's pydoc topics.

    python scripts/make_finetune_assets.py

Standard library only; the source is ``pydoc_data.topics`` (the Language Reference
text shown by ``help()``), so the output depends on the Python version (built with
3.11). Everything is deterministic: no randomness, topics and paragraphs in sorted
order. Splits are by topic document (every paragraph of a topic goes to the same
split) and a paragraph shared by several topics is kept once only, so no text is
in both train and val.

- topics_{train,val}.csv (``text,label``): prose paragraphs (cut to a few
  sentences) labelled by the kind of topic they come from: ``statement``,
  ``expression``, ``datamodel`` or ``builtins`` (the built-in types' library docs).
- code_spans_{train,val}.conll: sentences, whitespace-tokenised, double-quoted
  code (pydoc marks code as ``"None"``) tagged ``B-CODE`` / ``I-CODE``, the rest
  ``O``; the quote characters are removed and punctuation outside the quotes is
  split into its own tokens.
- squad_{train,val}.json (SQuAD v1): cloze questions: a sentence of the context
  with one quoted code term replaced by ``___``; the answer is that term.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

from make_assets import prose_paragraphs  # this folder is on sys.path when run as a script

OUT = Path(__file__).resolve().parent.parent / "assets" / "finetune"

LABELS: dict[str, list[str]] = {
    "statement": [
        "assert", "assignment", "augassign", "break", "class", "continue", "del", "for", "function",
        "global", "if", "import", "nonlocal", "pass", "raise", "return", "try", "while", "with",
    ],
    "expression": [
        "atom-identifiers", "atom-literals", "attribute-references", "await", "binary", "bitwise",
        "booleans", "calls", "comparisons", "conversions", "dict", "exprlists", "in", "lambda", "lists",
        "operator-summary", "power", "shifting", "slicings", "subscriptions", "unary", "yield",
    ],
    "datamodel": [
        "attribute-access", "context-managers", "customization", "numeric-types", "objects",
        "sequence-types", "specialattrs", "specialnames", "types",
    ],
    "builtins": [
        "bltin-code-objects", "bltin-ellipsis-object", "bltin-null-object", "bltin-type-objects",
        "formatstrings", "string-methods", "truth", "typesfunctions", "typesmapping", "typesmethods",
        "typesmodules", "typesseq", "typesseq-mutable",
    ],
}  # fmt: skip
VAL_FRACTION = 0.2
MAX_CHARS = 300  # classification paragraphs are cut to whole sentences within this
MAX_CONTEXT = 400  # QA contexts (whole sentences); <= 600 asked, 400 keeps the files small
MAX_SENTENCE_TOKENS = 40
MAX_ANSWER_CHARS = 40

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_TOKEN = re.compile(r'"[^"]+"|[^\s"]+')
_QUOTED = re.compile(r'"([^"\s][^"]*)"')


def split_sentences(text: str) -> list[str]:
    return [s for s in (p.strip() for p in _SENTENCE_END.split(text)) if s]


def key(name: str) -> str:
    return hashlib.md5(name.encode()).hexdigest()


def load() -> dict[str, dict[str, list[str]]]:
    """{split: {topic: paragraphs}}: unique paragraphs, topics split ~80/20 by paragraph count per label."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    paras: dict[str, list[str]] = {}
    # smaller topics first: a paragraph repeated in a big chapter (specialnames, types) stays with
    # its own small topic
    names = sorted((n for ns in LABELS.values() for n in ns), key=lambda n: (len(topics[n]), n))
    for name in names:
        kept = []
        for p in prose_paragraphs(topics[name], min_chars=80):
            if p not in seen:
                seen.add(p)
                kept.append(p)
        paras[name] = kept
    splits: dict[str, dict[str, list[str]]] = {"train": {}, "val": {}}
    for names in LABELS.values():
        total = sum(len(paras[n]) for n in names)
        val = 0
        for name in sorted(names, key=key):  # a fixed pseudo-random order
            n = len(paras[name])
            if n and val + n <= VAL_FRACTION * total * 1.25 and (val < VAL_FRACTION * total):
                splits["val"][name] = paras[name]
                val += n
            else:
                splits["train"][name] = paras[name]
    return splits


def label_of(topic: str) -> str:
    return next(label for label, names in LABELS.items() if topic in names)


def shorten(para: str, limit: int) -> str:
    out = ""
    for s in split_sentences(para):
        if out and len(out) + 1 + len(s) > limit:
            break
        out = f"{out} {s}" if out else s
    return out


def tag_sentence(sentence: str) -> list[tuple[str, str]] | None:
    if sentence.count('"') % 2:
        return None
    out = []
    for tok in _TOKEN.findall(sentence):
        if tok.startswith('"'):
            words = tok[1:-1].split()
            out += [(w, "B-CODE" if i == 0 else "I-CODE") for i, w in enumerate(words)]
        else:
            out.append((tok, "O"))
    return out


def cloze(context: str, qid: str) -> list[dict]:
    """One cloze question per context: the first sentence with a short quoted term."""
    pos = 0
    for sentence in split_sentences(context):
        start = context.find(sentence, pos)
        pos = start + len(sentence)
        if sentence.count('"') % 2:
            continue
        terms = [m for m in _QUOTED.finditer(sentence) if len(m.group(1).strip()) <= MAX_ANSWER_CHARS]
        if not terms:
            continue
        m = terms[0]
        text = m.group(1)
        answer_start = start + m.start(1)
        assert context[answer_start : answer_start + len(text)] == text
        question = "Which term fills the blank: " + sentence[: m.start()] + "___" + sentence[m.end() :]
        return [{"id": qid, "question": question, "answers": [{"text": text, "answer_start": answer_start}]}]
    return []


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for split, topics in load().items():
        rows, conll, articles, asked = [], [], [], 0
        for topic in sorted(topics):
            label = label_of(topic)
            paragraphs = []
            for i, para in enumerate(topics[topic]):
                rows.append({"text": shorten(para, MAX_CHARS), "label": label})
                for sentence in split_sentences(para):
                    tagged = tag_sentence(sentence)
                    if tagged and len(tagged) <= MAX_SENTENCE_TOKENS and any(t != "O" for _, t in tagged):
                        conll.append(tagged)
                context = shorten(para, MAX_CONTEXT)
                qas = cloze(context, f"{topic}-{i}")
                if qas:
                    asked += 1
                if qas and asked % 2:  # every other answerable paragraph keeps the file small
                    paragraphs.append({"context": context, "qas": qas})
            if paragraphs:
                articles.append({"title": topic, "paragraphs": paragraphs})
        with open(OUT / f"topics_{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, ["text", "label"], lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        (OUT / f"code_spans_{split}.conll").write_text(
            "\n".join("".join(f"{w} {t}\n" for w, t in s) for s in conll), encoding="utf-8"
        )
        (OUT / f"squad_{split}.json").write_text(
            json.dumps({"version": "1.1", "data": articles}, ensure_ascii=False, indent=None) + "\n",
            encoding="utf-8",
        )
        counts = {label: sum(r["label"] == label for r in rows) for label in LABELS}
        print(f"{split}: {len(rows)} paragraphs {counts}, {len(conll)} tagged sentences, "
              f"{sum(len(p['qas']) for a in articles for p in a['paragraphs'])} questions; "
              f"val topics: {sorted(topics) if split == 'val' else '-'}")  # fmt: skip


if __name__ == "__main__":
    main()

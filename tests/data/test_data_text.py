"""Language-modelling collators and text datasets, on the bundled corpus and tokenizer."""

import json

import pytest
import torch

from mmlm.data import (
    IGNORE,
    CLMCollator,
    CLMDataset,
    MLMCollator,
    MLMDataset,
    NSPDataset,
    QACollator,
    SkippingDataLoader,
    SquadDataset,
    TextClassificationCollator,
    TextClassificationDataset,
    TokenClassificationCollator,
    TokenClassificationDataset,
    document_attention_mask,
    extract_answers,
    read_documents,
)


@pytest.fixture(scope="module")
def documents(assets):
    return read_documents(assets / "corpus.txt")


def test_mlm_masking_statistics(documents, wordpiece):
    ds = MLMDataset(documents, wordpiece, max_length=64)
    collate = MLMCollator(wordpiece, context_length=64)
    special_ids = torch.tensor(wordpiece.all_special_ids)
    eligible = masked = to_mask = to_random = kept = 0
    for start in range(0, len(ds), 32):
        samples = [ds[i] for i in range(start, min(start + 32, len(ds)))]
        batch = collate(samples)
        clean = wordpiece([s["text"] for s in samples], context_length=64)["input_ids"]
        ids, labels = batch["input_ids"], batch["labels"]
        assert ids.shape == clean.shape and batch["token_type_ids"].shape == ids.shape
        special = torch.isin(clean, special_ids)  # [CLS], [SEP], [PAD]
        assert (labels[special] == IGNORE).all() and (ids[special] == clean[special]).all()
        picked = labels != IGNORE
        assert (labels[picked] == clean[picked]).all()
        # nothing outside the picked positions changes, and no special token is ever inserted
        assert (ids[~picked] == clean[~picked]).all()
        assert not torch.isin(ids[picked & (ids != wordpiece.mask_token_id)], special_ids).any()
        eligible += int((~special).sum())
        masked += int(picked.sum())
        to_mask += int((ids[picked] == wordpiece.mask_token_id).sum())
        to_random += int(((ids[picked] != wordpiece.mask_token_id) & (ids[picked] != clean[picked])).sum())
        kept += int((ids[picked] == clean[picked]).sum())
        if eligible >= 20_000:
            break
    assert eligible >= 20_000
    assert abs(masked / eligible - 0.15) < 0.01
    assert abs(to_mask / masked - 0.8) < 0.01
    assert abs(to_random / masked - 0.1) < 0.01
    assert abs(kept / masked - 0.1) < 0.01


def test_nsp_pairs_are_balanced_and_correct(documents, wordpiece):
    ds = NSPDataset(documents, wordpiece, max_length=64, seed=1)
    joined = [" ".join(d.splitlines()) for d in documents]
    labels = []
    for i in range(len(ds)):
        item = ds[i]
        doc, _ = ds.starts[i]
        labels.append(item["next_sentence_label"])
        if item["next_sentence_label"] == 0:  # B is what follows A in the same document
            assert f"{item['text']} {item['text_pair']}" in joined[doc]
        else:  # B comes from another document (the corpus repeats a few sentences across documents)
            assert f"{item['text']} {item['text_pair']}" not in joined[doc]
            assert any(item["text_pair"] in d for j, d in enumerate(joined) if j != doc)
    assert len(labels) > 900
    assert abs(sum(labels) / len(labels) - 0.5) < 0.02
    ds.set_epoch(1)  # a new epoch draws new pairs, still balanced
    again = [ds[i]["next_sentence_label"] for i in range(len(ds))]
    assert again != labels and abs(sum(again) / len(again) - 0.5) < 0.02
    batch = MLMCollator(wordpiece, context_length=64)([ds[0], ds[1], ds[2], ds[3]])
    assert batch["next_sentence_label"].tolist() == [ds[i]["next_sentence_label"] for i in range(4)]
    assert batch["input_ids"].shape[1] <= 64
    assert (batch["token_type_ids"].sum(1) > 0).all()  # segment B is marked


def test_clm_packing_keeps_documents_apart(wordpiece):
    docs = ["The first document is short.", "A second one, a little longer than the first.", "Third."]
    ds = CLMDataset(docs, wordpiece, block_size=8)
    eot = wordpiece.eot_token_id
    expected = []
    for d in docs:
        expected += wordpiece.encode(d, add_special_tokens=False) + [eot]
    batch = CLMCollator(wordpiece.pad_token_id)([ds[i] for i in range(len(ds))])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids[mask.bool()].tolist() == expected  # packed in order, each document ends with end-of-text
    assert len(ds) == -(-len(expected) // 8) and ids.shape == (len(ds), 8)
    assert (batch["labels"][mask == 0] == IGNORE).all() and (batch["labels"][mask == 1] == ids[mask == 1]).all()
    docs_ids = batch["document_ids"]
    for row in range(len(ds)):  # the document id steps up right after each end-of-text
        n = int(mask[row].sum())
        for t in range(1, n):
            step = int(docs_ids[row, t] - docs_ids[row, t - 1])
            assert step == int(ids[row, t - 1] == eot)
        assert docs_ids[row, 0] == 0 and (docs_ids[row, n:] == -1).all()
    attend = document_attention_mask(docs_ids)[:, 0]  # (B, T, T)
    same = docs_ids[:, :, None] == docs_ids[:, None, :]
    assert not (attend & ~same).any()  # never across documents
    assert not attend.triu(1).any()  # never ahead
    assert attend.diagonal(dim1=1, dim2=2).all()  # every row attends somewhere


CONLL = """-DOCSTART- -X- O O

Guido NNP B-PER
van NNP I-PER
Rossum NNP I-PER
created VBD O
Python NNP B-MISC
in IN O
Amsterdam NNP B-LOC
. . O

The DT O
interpreter NN O
raised VBD O
SyntaxError NNP B-MISC
. . O
"""


def test_token_classification_labels_first_subwords(tmp_path, wordpiece):
    (tmp_path / "ner.conll").write_text(CONLL)
    ds = TokenClassificationDataset(tmp_path / "ner.conll")
    assert ds.classes == ["O", "B-LOC", "B-MISC", "B-PER", "I-PER"]
    batch = TokenClassificationCollator(wordpiece)([ds[0], ds[1]])
    split_words = 0
    for row, item in enumerate([ds[0], ds[1]]):
        enc = wordpiece.encode_batch([item["words"]], is_pretokenized=True)[0]
        labels = batch["labels"][row, : len(enc.ids)].tolist()
        firsts = [t for t, w in enumerate(enc.word_ids) if w is not None and (t == 0 or enc.word_ids[t - 1] != w)]
        assert [labels[t] for t in firsts] == item["tags"]  # one label per word, on its first sub-word
        assert all(labels[t] == IGNORE for t in range(len(labels)) if t not in firsts)
        split_words += len(enc.ids) - len(item["words"]) - 2
    assert split_words >= 3  # "Guido", "Rossum", "Amsterdam" are not in the corpus vocabulary: several sub-words


def test_text_classification_pairs_and_bad_rows(tmp_path, wordpiece):
    rows = [
        {"premise": "A cat sleeps.", "hypothesis": "An animal rests.", "label": "entailment"},
        {"premise": "A cat sleeps.", "hypothesis": "A dog barks.", "label": "neutral"},
        {"premise": "", "hypothesis": "Nothing.", "label": "neutral"},
        {"premise": "Fine.", "hypothesis": "Fine.", "label": None},
    ]
    (tmp_path / "nli.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = TextClassificationDataset(tmp_path / "nli.jsonl", "premise", "label", text_pair_key="hypothesis")
    loader = SkippingDataLoader(ds, batch_size=4, collate_fn=TextClassificationCollator(wordpiece))
    (batch,) = list(loader)
    assert ds.classes == ["entailment", "neutral"] and batch["label"].tolist() == [0, 1]
    assert batch["token_type_ids"][0].max() == 1 and batch["input_ids"].shape[0] == 2
    assert loader.stats.history == [{"bad_label": 1, "empty_text": 1}]


def test_squad_windows_map_back_to_the_answer(tmp_path, documents, wordpiece):
    answer = "augmented assignment"
    d = next(i for i, doc in enumerate(documents) if answer in doc.lower())
    context = " ".join(documents[d - 1].splitlines() + documents[d].splitlines())
    start = context.lower().index(answer)
    answer = context[start : start + len(answer)]
    qas = [
        {
            "id": "q1",
            "question": "What evaluates its target once?",
            "answers": [{"text": answer, "answer_start": start}],
        },
        {"id": "q2", "question": "Unanswerable?", "answers": [], "is_impossible": True},
    ]
    squad = {"data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    ds = SquadDataset(tmp_path / "squad.json", wordpiece, max_length=48, doc_stride=16)
    n_windows = sum(1 for f in ds.features if f["example_index"] == 0)
    assert n_windows > 2  # the context needs several windows
    batch = QACollator(wordpiece.pad_token_id)([ds[i] for i in range(len(ds))])
    hits = 0
    for b in range(len(ds)):
        s, e = int(batch["start_positions"][b]), int(batch["end_positions"][b])
        if s == 0:
            continue
        hits += 1
        off = batch["offset_mapping"][b]
        assert context[int(off[s, 0]) : int(off[e, 1])] == answer
        assert (batch["token_type_ids"][b, s : e + 1] == 1).all()
    assert hits >= 1 and all(f["start_positions"] == 0 for f in ds.features if f["example_index"] == 1)
    # gold positions as logits come back as the answer text
    start_logits = torch.nn.functional.one_hot(batch["start_positions"], batch["input_ids"].shape[1]).float()
    end_logits = torch.nn.functional.one_hot(batch["end_positions"], batch["input_ids"].shape[1]).float()
    has = batch["start_positions"] > 0
    answers = extract_answers(start_logits[has], end_logits[has], batch["offset_mapping"][has],
                              batch["example_index"][has], [e["context"] for e in ds.examples])  # fmt: skip
    assert {ex: text for ex, (_, text) in answers.items()} == {0: answer}

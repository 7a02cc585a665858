"""mmlm CoCa -> open_clip folder, checked by open_clip's own factory in a process without mmlm: embeddings, decoder
logits and greedy captions (argmax of open_clip's logits, token by token) equal mmlm's; the folder loads back
into mmlm bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from _client import run_client

import mmlm
from mmlm.convert.common import ConversionError
from mmlm.export import export

pytestmark = pytest.mark.slow  # a second Python process importing open_clip and torch

CLIENT = """
import json, torch, open_clip

model, _, preprocess = open_clip.create_model_and_transforms("local-dir:model")
model.eval()
job = torch.load("job.pt")
images, ids = job["images"], job["ids"]
with torch.no_grad():
    out = model(images[: len(ids)], ids)
    latent, embs = model._encode_image(images)
    text = torch.full((len(images), 1), 49406, dtype=torch.long)
    for _ in range(job["steps"]):
        logits = model(images, text, image_latent=latent, image_embs=embs, output_labels=False)["logits"]
        text = torch.cat([text, logits[:, -1].argmax(-1, keepdim=True)], 1)
torch.save({"image": model.encode_image(images, normalize=False), "text": model.encode_text(ids, normalize=False),
            "logits": out["logits"], "greedy": text}, "out.pt")
print(json.dumps({"type": type(model).__name__, "tokenizer": type(open_clip.get_tokenizer("local-dir:model")).__name__}))
"""


def test_open_clip_runs_the_exported_coca(tmp_path):
    torch.manual_seed(0)
    model = mmlm.create_model("coca-tiny")
    with torch.no_grad():  # LayerNorms at 1/0 and zero biases would hide a swapped norm or a dropped bias
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    export(model, tmp_path / "model", "open_clip")
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.zeros(3, 31, dtype=torch.long)  # open_clip's tokenizer pads every text to the context (31 here)
    for i, n in enumerate((5, 9, 31)):
        ids[i, :n] = torch.randint(1, 49405, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = 49406, 49407
    torch.save({"images": images, "ids": ids, "steps": 10}, tmp_path / "job.pt")
    facts = run_client(CLIENT, cwd=tmp_path)
    assert facts == {"type": "CoCa", "tokenizer": "SimpleTokenizer"}
    out = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        torch.testing.assert_close(out["image"], model.encode_image(images, normalize=False), atol=1e-5, rtol=0)
        torch.testing.assert_close(out["text"], model.encode_text(ids, normalize=False), atol=1e-5, rtol=0)
        torch.testing.assert_close(out["logits"], model(images, ids).logits, atol=1e-4, rtol=0)
    ours = model.generate(images, max_new_tokens=10)
    stop = ours.shape[1]
    assert torch.equal(ours, out["greedy"][:, :stop])

    back = mmlm.load_pretrained(tmp_path / "model")
    assert back.cfg == model.cfg
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert json.loads((tmp_path / "model" / "open_clip_config.json").read_text())["model_cfg"]["custom_text"]


def test_what_open_clip_cannot_express(tmp_path):
    model = mmlm.create_model("coca-tiny", legacy_cls_mask=False, share="attention_mlp")
    with pytest.raises(ConversionError, match="share='attention_mlp'.*\\n.*legacy_cls_mask=False"):
        export(model, tmp_path / "model", "open_clip")

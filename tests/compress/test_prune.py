"""Structured pruning: the parameter count of the smaller config, nothing changed at keep=1.0, the least
active heads / units / channels are the ones removed, and the result saves, loads and fine-tunes."""

from __future__ import annotations

import pytest
import torch

import mmlm
from mmlm.cli import main
from mmlm.compress import prune_clip, pruned_config
from mmlm.compress.prune import importance, keep_indices
from mmlm.config import CLIPConfig
from mmlm.tasks import ContrastiveAlignment

EOT = mmlm.from_name("clip-tiny").text.eot_token_id


def batches(n: int = 2, size: int = 8):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        ids = torch.randint(1, 5000, (size, 10), generator=g)
        ids[:, -1] = EOT
        yield {"image": torch.randn(size, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": torch.ones_like(ids)}


def expected_parameters(cfg: CLIPConfig) -> int:
    """Counted by hand from the shapes of OpenAI's CLIP (no patch bias, learned positions, ln_pre)."""

    def blocks(t) -> int:
        w, m = t.width, t.mlp_dim
        return t.depth * (2 * w + 3 * w * w + 3 * w + w * w + w + 2 * w + m * w + m + w * m + w)

    v, t = cfg.vision, cfg.text
    vision = v.width * 3 * v.patch_size**2 + v.width + (1 + v.grid_size**2) * v.width + 2 * v.width + blocks(v) + 2 * v.width
    text = t.vocab_size * t.width + t.context_length * t.width + blocks(t) + 2 * t.width
    return vision + text + cfg.embed_dim * (v.width + t.width) + 1


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def clip():
    return mmlm.resolve("clip-tiny", seed=0).eval()


def test_half_is_a_plain_smaller_config_with_the_expected_count(clip):
    pruned = prune_clip(clip, 0.5, batches())
    cfg = pruned.cfg
    assert (cfg.vision.heads, cfg.vision.width, cfg.vision.mlp_dim) == (2, 32, 128)
    assert (cfg.text.heads, cfg.text.width, cfg.text.mlp_dim, cfg.embed_dim) == (2, 32, 128, 32)
    assert count(clip) == expected_parameters(clip.cfg) == 3_382_017
    assert count(pruned) == expected_parameters(cfg) == 1_641_857
    assert count(pruned) == count(mmlm.create_model(pruned_config(clip.cfg, 0.5)))


def test_keep_everything_changes_nothing(clip):
    same = prune_clip(clip, 1.0, batches())
    assert same.cfg == clip.cfg
    ref = clip.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in same.state_dict().items())
    (data,) = batches(1)
    with torch.no_grad():
        assert torch.equal(same.encode_image(data["image"]), clip.encode_image(data["image"]))
        assert torch.equal(same.encode_text(data["input_ids"]), clip.encode_text(data["input_ids"]))


def test_silent_heads_units_and_channels_are_the_ones_removed():
    model = mmlm.resolve("clip-tiny", seed=1).eval()
    width, hd = 64, 16
    with torch.no_grad():
        for block in model.visual.blocks:
            for head in (0, 3):  # their value rows are zero: these heads output nothing
                block.attn.qkv.weight[2 * width + head * hd : 2 * width + (head + 1) * hd] = 0
                block.attn.qkv.bias[2 * width + head * hd : 2 * width + (head + 1) * hd] = 0
            block.mlp.fc1.weight[:128] = 0  # quick_gelu(-30) = -2e-21: units 0-127 are dead
            block.mlp.fc1.bias[:128] = -30
        for norm in (model.visual.norm_pre, model.visual.norm, *(b.norm1 for b in model.visual.blocks),
                     *(b.norm2 for b in model.visual.blocks)):  # fmt: skip
            norm.weight[:32] = 0  # channels 0-31 leave every LayerNorm as zeros
            norm.bias[:32] = 0
    kept = keep_indices(model, importance(model, batches()), 0.5)
    assert kept["visual.channels"].tolist() == list(range(32, 64))
    for i in range(2):
        assert kept[f"visual.blocks.{i}.heads"].tolist() == [1, 2]
        assert kept[f"visual.blocks.{i}.units"].tolist() == list(range(128, 256))
    pruned = prune_clip(model, 0.5, batches())
    old, new = model.visual.blocks[1], pruned.visual.blocks[1]
    assert torch.equal(new.mlp.fc1.weight, old.mlp.fc1.weight[128:, 32:])
    assert torch.equal(new.mlp.fc2.weight, old.mlp.fc2.weight[32:, 128:])
    q_rows = list(range(16, 48))  # heads 1 and 2
    rows = q_rows + [r + width for r in q_rows] + [r + 2 * width for r in q_rows]
    assert torch.equal(new.attn.qkv.weight, old.attn.qkv.weight[rows][:, 32:])
    assert torch.equal(new.attn.proj.weight, old.attn.proj.weight[32:][:, q_rows])
    assert torch.equal(pruned.visual_projection.weight, model.visual_projection.weight[:, 32:])


def test_pruned_model_saves_loads_and_fine_tunes(clip, tmp_path):
    pruned = prune_clip(clip, 0.5, batches())
    mmlm.save(pruned, tmp_path / "pruned")
    loaded = mmlm.load_pretrained(tmp_path / "pruned")
    (data,) = batches(1)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(data["image"]), pruned.encode_image(data["image"]))
    task = ContrastiveAlignment(str(tmp_path / "pruned"))
    task.train()
    loss = task.training_step({**data, "image_id": torch.arange(8)}, 0)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in task.parameters())


@pytest.mark.slow
def test_prune_command_calibrates_on_digits(tmp_path, capsys):
    out = tmp_path / "pruned"
    main(["prune", "clip-tiny", "--keep", "0.5", "--out", str(out), "--samples", "32", "--batch-size", "16"])
    assert "3,382,017 -> 1,641,857 parameters" in capsys.readouterr().out
    model = mmlm.load_pretrained(out)
    assert model.cfg == pruned_config(mmlm.from_name("clip-tiny"), 0.5)
    for args, message in ((["--keep", "0"], "keep must be in (0, 1]"), (["--data", str(tmp_path / "none.csv")], "none.csv")):
        with pytest.raises(SystemExit) as exit_:
            main(["prune", "clip-tiny", "--out", str(tmp_path / "x"), *args])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "mmlm prune: error: " in err and message in err and "Traceback" not in err

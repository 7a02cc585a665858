"""int8: the arithmetic is the documented dynamic quantization, the folder holds int8 bytes and loads back
bit for bit, and every command that takes a model name takes the folder."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import mmlm
from mmlm.cli import main
from mmlm.compress import is_int8, quantize_int8
from mmlm.compress.quantize import DynamicInt8Linear

EOT = mmlm.from_name("clip-tiny").text.eot_token_id


def inputs(n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 5000, (n, 10), generator=g)
    ids[:, -1] = EOT
    return torch.randn(n, 3, 32, 32, generator=g), ids, torch.ones_like(ids)


@pytest.fixture(scope="module")
def clip() -> mmlm.CLIP:
    return mmlm.resolve("clip-tiny", seed=0).eval()


def test_linear_is_per_channel_int8_weights_times_8_bit_activations():
    """The layer's output is, to float rounding, the integer product PyTorch's dynamic quantization defines:
    weights symmetric per output row (scale max|w| / 127.5), activations affine over the whole call
    (all 8 bits on a VNNI CPU, 7 without). Quantization error itself is 1e5 times larger."""
    lin = nn.Linear(64, 48)
    layer = quantize_int8(nn.Sequential(lin))[0]
    assert isinstance(layer, DynamicInt8Linear)
    qmax = 255 if torch.cpu._is_vnni_supported() else 127
    w, b = lin.weight.detach(), lin.bias.detach().double()
    w_scale = w.abs().amax(1) / 127.5
    w_int = torch.round(w * (1 / w_scale)[:, None]).clamp(-128, 127)
    for shift in (0.0, 2.0):
        x = torch.randn(5, 7, 64) * 3 + shift
        lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
        scale = torch.tensor((hi - lo) / qmax)
        zero = round(-lo / scale.item())
        x_int = (torch.round(x * (1 / scale)) + zero).clamp(0, qmax)
        expected = ((x_int - zero).double() @ (w_int.double() * w_scale.double()[:, None]).T) * scale.double() + b
        got = layer(x).double()
        assert (got - expected).abs().max() < 1e-5
        assert (got - (x.double() @ w.double().T + b)).abs().max() > 1e-3  # it is quantized


def test_copy_is_int8_original_untouched_and_embeddings_stay_close(clip):
    int8 = quantize_int8(clip)
    assert is_int8(int8) and not is_int8(clip)
    assert sum(isinstance(m, DynamicInt8Linear) for m in int8.modules()) == sum(
        type(m) is nn.Linear for m in clip.modules()
    )
    images, ids, mask = inputs()
    with torch.no_grad():
        for a, b in ((clip.encode_image(images), int8.encode_image(images)),
                     (clip.encode_text(ids, mask), int8.encode_text(ids, mask))):  # fmt: skip
            assert F.cosine_similarity(a, b).min() > 0.99
    with pytest.raises(ValueError, match="already int8"):
        quantize_int8(int8)


@pytest.mark.slow
def test_folder_holds_int8_bytes_and_loads_back_bit_for_bit(clip, tmp_path):
    int8 = quantize_int8(clip)
    mmlm.save(clip, tmp_path / "fp32")
    mmlm.save(int8, tmp_path / "int8")
    assert json.loads((tmp_path / "int8" / "config.json").read_text())["quantization"] == "int8"
    linears = {n: m for n, m in clip.named_modules() if type(m) is nn.Linear}
    with safe_open(tmp_path / "int8" / "model.safetensors", "pt") as f:
        for name in linears:
            assert f.get_slice(f"{name}.weight").get_dtype() == "I8"
    # each Linear weight: 4 bytes -> 1, plus one float64 scale per output row; the rest is the same
    n_weights = sum(m.weight.numel() for m in linears.values())
    n_rows = sum(m.out_features for m in linears.values())
    saved = (tmp_path / "fp32" / "model.safetensors").stat().st_size - (tmp_path / "int8" / "model.safetensors").stat().st_size
    assert abs(saved - (3 * n_weights - 8 * n_rows)) < 4096  # the JSON headers differ by a few hundred bytes

    for loaded in (mmlm.load_pretrained(tmp_path / "int8"), mmlm.load(tmp_path / "int8"), mmlm.resolve(tmp_path / "int8")):
        assert is_int8(loaded) and not loaded.training
        images, ids, mask = inputs()
        with torch.no_grad():
            assert torch.equal(loaded.encode_image(images), int8.encode_image(images))
            assert torch.equal(loaded.encode_text(ids, mask), int8.encode_text(ids, mask))
    mmlm.save(mmlm.load(tmp_path / "int8"), tmp_path / "again")  # a loaded int8 model saves the same bytes
    with safe_open(tmp_path / "int8" / "model.safetensors", "pt") as a, safe_open(tmp_path / "again" / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118 (safe_open is no dict)


@pytest.mark.slow
def test_quantize_and_zeroshot_commands_take_the_folder(tmp_path, capsys):
    out = tmp_path / "int8"
    main(["quantize", "clip-tiny", "--out", str(out)])
    assert "int8 Linear layers" in capsys.readouterr().out
    model = mmlm.load_pretrained(out)
    assert is_int8(model)
    ref = quantize_int8(mmlm.resolve("clip-tiny", seed=0))  # the command's preset: seed 0 as in resolve
    images, _, _ = inputs()
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), ref.encode_image(images))
    main(["zeroshot", str(out), "--templates", "simple", "--output", str(tmp_path / "result.json")])
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["samples"]["used"] == 360 and 0 <= result["metrics"]["acc1"] <= 1


def test_quantize_mistakes_give_one_line(tmp_path, capsys):
    for args, message in ((["quantize", "clip-tiny"], "--out DIR"),
                          (["quantize", "no-such-model", "--out", str(tmp_path / "x")], "unknown preset")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "mmlm quantize: error: " in err and message in err and "Traceback" not in err


@pytest.mark.slow
def test_int8_switch_quantizes_on_the_fly(capsys):
    from mmlm.factory import load

    assert is_int8(load("clip-tiny", int8=True).model) and not is_int8(load("clip-tiny").model)
    main(["zeroshot", "clip-tiny", "--dataset", "digits", "--int8"])
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{") :])
    assert result["samples"]["used"] == 360 and 0.0 <= result["metrics"]["acc1"] <= 1.0

"""Contrastive losses against OpenCLIP's, and distributed exactness on 2 gloo processes."""

import socket

import open_clip.loss as oc
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mmlm.losses import clip_loss, siglip_loss


def features(n: int = 8, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1))


def test_clip_loss_equals_openclip():
    img, txt = features()
    scale = torch.tensor(14.3)
    torch.testing.assert_close(clip_loss(img, txt, scale), oc.ClipLoss()(img, txt, scale), rtol=0, atol=1e-6)
    bias = torch.tensor(-2.0)
    torch.testing.assert_close(clip_loss(img, txt, scale, bias), oc.ClipLoss()(img, txt, scale, bias), rtol=0, atol=1e-6)


def test_siglip_loss_equals_openclip():
    img, txt = features()
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    torch.testing.assert_close(siglip_loss(img, txt, scale, bias), oc.SigLipLoss()(img, txt, scale, bias), rtol=0, atol=1e-5)


def test_perfectly_aligned_pairs_have_near_zero_clip_loss():
    img, _ = features()
    aligned = clip_loss(img, img, torch.tensor(100.0))
    assert aligned < 1e-3 < clip_loss(*features(), torch.tensor(100.0))


# ---------------------------------------------------------------- distributed exactness


class Towers(torch.nn.Module):
    """Two small encoders; stand-ins for the image and text towers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
        self.text = torch.nn.Linear(10, 16)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.3))
        self.logit_bias = torch.nn.Parameter(torch.tensor(-1.0))

    def loss(self, kind, x_img, x_txt):
        img = F.normalize(self.image(x_img), dim=-1)
        txt = F.normalize(self.text(x_txt), dim=-1)
        if kind == "clip":  # softmax is shift-invariant: a bias would only get a 0 (float noise) gradient
            return clip_loss(img, txt, self.logit_scale.exp()) + 0 * self.logit_bias
        return siglip_loss(img, txt, self.logit_scale.exp(), self.logit_bias)


def inputs(n: int = 8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 12, generator=g), torch.randn(n, 10, generator=g)


def _rank_worker(rank: int, world: int, port: int, kind: str, out: str):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = Towers()
    x_img, x_txt = inputs()
    half = x_img.shape[0] // world
    rows = slice(rank * half, (rank + 1) * half)
    model.loss(kind, x_img[rows], x_txt[rows]).backward()
    grads = {}
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad)  # what DDP does: average gradients over ranks
        grads[name] = p.grad / world
    if rank == 0:
        torch.save(grads, out)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.processes
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_two_rank_gradients_equal_full_batch_gradients(tmp_path, kind):
    out = str(tmp_path / "grads.pt")
    mp.spawn(_rank_worker, args=(2, free_port(), kind, out), nprocs=2, join=True)
    distributed = torch.load(out)

    model = Towers()
    model.loss(kind, *inputs()).backward()
    for name, p in model.named_parameters():
        if kind == "clip" and name == "logit_bias":
            continue
        scale = p.grad.abs().max()
        assert scale > 0
        assert (distributed[name] - p.grad).abs().max() <= 1e-5 * scale, name  # relative to the largest entry

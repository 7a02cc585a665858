"""Shared by the conversion tests: compare against a reference library's output, report the gap."""

from __future__ import annotations

import os

import torch

# every reference model is built locally; nothing may reach a model hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def assert_parity(ours: torch.Tensor, ref: torch.Tensor, atol: float = 1e-4, what: str = "") -> float:
    """max |ours - ref| <= atol (no relative slack); returns the gap so ``pytest -s`` shows it."""
    ours, ref = ours.detach().float(), ref.detach().float()
    torch.testing.assert_close(ours, ref, atol=atol, rtol=0)
    gap = (ours - ref).abs().max().item()
    print(f"[parity] {what}: max|diff| = {gap:.2e}")
    return gap


@torch.no_grad()
def randomize_(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter: libraries init LayerNorms to 1/0 and biases to 0, which would hide
    a swapped norm or a dropped bias from a parity test."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * std)
    return model

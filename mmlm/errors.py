"""User mistakes: the error type a command raises for one, and the checks every command runs before any work.

``mmlm.cli`` prints a ``UsageError`` (like the ValueError and OSError a validation point raises) as one line
``mmlm COMMAND: error: ...`` and exits with 2. Imports nothing heavy: torch loads inside ``check_device`` only.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A value the user typed or pointed at is wrong; the message names it and says what would do."""


class UsageTypeError(UsageError, TypeError):
    """The user named something of the wrong kind (a ViT where a CLIP is needed, a config field a config does not
    have): a TypeError to Python code, a one-line mistake to the CLI, which reports other TypeErrors as bugs."""


class UsageKeyError(UsageError, KeyError):
    """The user named what no table holds (a preset): a KeyError to Python code, a one-line mistake to the CLI."""

    def __str__(self) -> str:  # KeyError's own would quote the message
        return str(self.args[0]) if self.args else ""


def check_device(device: str) -> None:
    """Refuse, before a model is loaded, a ``--device`` this machine does not have (``cuda`` without a GPU,
    ``cuda:3`` on a machine with 2, ``mps`` off a Mac)."""
    import torch

    try:
        kind = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {device}: not a device; give cpu, cuda, cuda:N or mps") from None
    if kind.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {device}: no CUDA device on this machine; use --device cpu")
        if kind.index is not None and kind.index >= count:
            raise UsageError(f"--device {device}: no CUDA device {kind.index}; this machine has cuda:0 to "
                             f"cuda:{count - 1}")  # fmt: skip
    elif kind.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: no MPS device on this machine; use --device cpu")
    elif kind.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device}: mmlm runs on cpu, cuda, cuda:N or mps")


def check_port(port: int) -> None:
    """A TCP port number: 0 (any free one) to 65535."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: give a port from 1 to 65535 (0: any free one)")


def check_at_least(minimum: float, **values: float | None) -> None:
    """Each option given (not None) is ``minimum`` or more: ``check_at_least(1, batch_size=0)`` refuses
    ``--batch_size 0`` before a model loads, not when a DataLoader is built after it."""
    for name, value in values.items():
        if value is not None and value < minimum:
            raise UsageError(f"--{name} {value}: give {minimum} or more")

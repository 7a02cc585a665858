"""What an index job is and how it runs: ``Job``, ``Options`` and their defaults, stated once here.

``mmlm index build|add`` (``commands``), ``build`` and ``Index`` take their defaults from this module,
so a default changes in one place. Only the standard library is imported: the command line's
``--help`` reads these defaults without loading torch or FAISS.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

BATCH_SIZE = 64  # images per forward pass; part of the ``Job`` (a ``--resume`` keeps it), so not an Option
SPLIT = "test"  # of digits and CLIP_benchmark folders
IMAGE_KEY = "filepath"  # manifest column with the image path
BUNDLED = "assets"  # DATA naming the bundled photographs: assets/captions.csv


@dataclass(frozen=True)
class Job:
    """What is being embedded; a ``--resume`` continues only the very same job."""

    command: str  # build | add
    model: str
    weights: str  # weights_hash of the model
    data: str
    split: str
    image_key: str
    caption_key: str | None
    tokenizer: str | None
    act: str | None
    seed: int
    batch_size: int
    base: str | None = None  # add: the manifest being extended (its sha256)
    int8: bool = False  # embedded by an int8 copy of the model (``quantize_int8``)

    def id(self) -> str:
        """Names the job in the manifest's ``builds``: a ``--resume`` of an add killed after its swap finds
        its job already there, and only tidies up instead of adding the items twice."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Options:
    """How the job is run and written; free to change between a run and its ``--resume``. The class
    attributes are the defaults of every entry point (``Options.chunk_size`` in ``commands``)."""

    index_type: str = "auto"  # exact below 1M vectors, IVF-PQ above (``choose.auto_index_type``)
    dtype: str = "float32"  # of the stored embeddings
    nprobe: int | None = None  # IVF clusters searched per query; None: tuned against ``query_ms``
    max_index_memory: str | None = None  # e.g. 4G: ``auto`` chooses the index that fits (``choose.choose_index``)
    max_train_memory: str | None = None  # e.g. 2G: the training sample (float32 vectors) is cut to fit
    query_ms: float = 10.0  # the query time the tuning of nprobe aims under (autofaiss's default)
    shard_size: int = 1 << 20  # vectors per shard of an on-disk IVF (each also holds the quantizer)
    chunk_size: int = 4096  # items per chunk file: what a kill can lose
    num_workers: int = 0  # DataLoader workers; 0 reads in the main process
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    precision: str = "32-true"


def parse_size(size: str | int | None) -> int | None:
    """Bytes of ``4G``, ``512M``, ``800k``, ``1T`` (binary units, as ``free -h`` prints them) or a number."""
    if size is None or isinstance(size, int):
        return size
    text = size.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(float(text))
    except ValueError:
        raise ValueError(f"{size!r}: give a size such as 4G, 512M or a number of bytes") from None


def check_sizes(batch_size: int, options: Options) -> None:
    """A ValueError now, before the model loads, for a size Lightning or the chunking would trip on later."""
    for name, value in (("batch_size", batch_size), ("chunk_size", options.chunk_size), ("devices", options.devices),
                        ("num_nodes", options.num_nodes)):  # fmt: skip
        if value < 1:
            raise ValueError(f"{name}={value}: give a number >= 1")
    if options.shard_size < 1 or options.query_ms <= 0:
        raise ValueError(f"shard_size={options.shard_size}, query_ms={options.query_ms}: give numbers > 0")
    for name in ("max_index_memory", "max_train_memory"):
        try:  # a ValueError now, naming the option, for a size that does not read
            size = parse_size(getattr(options, name))
        except ValueError as e:
            raise ValueError(f"--{name} {e}") from None
        if size is not None and size <= 0:
            raise ValueError(f"--{name} {getattr(options, name)!r}: give a size above 0")
    if options.num_workers < 0:
        raise ValueError(f"num_workers={options.num_workers}: give 0 (read in the main process) or more")


def check_int8(int8: bool, options: Options) -> None:
    """int8 Linear layers run on the CPU: ``auto`` becomes ``cpu``, any other accelerator is refused."""
    if not int8:
        return
    if options.accelerator not in ("auto", "cpu"):
        raise ValueError(f"--accelerator {options.accelerator}: int8 embeds on the CPU; drop --int8 or the accelerator")
    if options.precision != Options.precision:  # the default, full precision
        raise ValueError(f"--precision {options.precision}: an int8 model computes in its own precision; drop one")
    options.accelerator = "cpu"

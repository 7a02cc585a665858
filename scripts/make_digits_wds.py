"""Write scikit-learn's digits as a CLIP_benchmark ``wds`` folder, for ``clip_benchmark eval --dataset wds/digits``.

    python scripts/make_digits_wds.py wds_digits            # the 360 held-out scans, 2 shards
    mmlm clip-benchmark eval --model_type mmlm --model CKPT --dataset wds/digits --dataset_root wds_digits ...

The folder must be new or empty. The same scans, class names and templates as ``mmlm zeroshot --dataset digits``.
"""

from __future__ import annotations

import argparse

from mmlm.data import write_clip_benchmark_wds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="a new folder: the --dataset_root of clip_benchmark eval")
    parser.add_argument("--split", choices=("train", "test"), default="test")
    parser.add_argument("--shards", type=int, default=2, help="tar files (clip_benchmark's --num_workers <= shards)")
    args = parser.parse_args()
    try:
        root = write_clip_benchmark_wds(args.out, args.split, args.shards)
    except (FileExistsError, ValueError) as e:
        parser.exit(2, f"make_digits_wds.py: error: {e}\n")
    print(f"wrote {root} ({args.split} split, {args.shards} shards)")


if __name__ == "__main__":
    main()

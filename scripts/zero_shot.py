"""Zero-shot classification of an image-text model; the same command as ``mmlm zeroshot``.

    python scripts/zero_shot.py runs/clip/last --dataset digits --output zs.json --confusion_matrix zs.png
    python scripts/zero_shot.py ViT-B-32.safetensors --act gelu --dataset imagenet/val --classnames names.txt --templates openai
    python scripts/zero_shot.py clip-tiny --dataset digits          # random weights: a smoke test
"""

from jsonargparse import CLI

from mmlm.cli import zeroshot

if __name__ == "__main__":
    CLI(zeroshot)

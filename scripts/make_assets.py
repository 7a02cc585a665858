"""Rebuild the sample data in ``assets/`` from sources installed with Python packages.

    python scripts/make_assets.py

- images/*.jpg + captions.csv: scikit-image's bundled photographs (only those whose
  licence is CC0 or public domain, see ATTRIBUTION.md), re-encoded as JPEG with the
  short side at most 256 px, plus a few crops of them; captions written by hand.
- corpus.txt: prose paragraphs of CPython's ``pydoc_data.topics``, one sentence
  per line, a blank line between paragraphs (BERT's pretraining format).
- tokenizer/: a WordPiece tokenizer trained on corpus.txt.
"""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

from PIL import Image

from mmlm.data.text_datasets import split_sentences
from mmlm.data.tokenizers import train_tokenizer

HERE = Path(__file__).resolve().parents[1] / "assets"  # the source tree's folder, which the wheel ships

# output name: (skimage file, crop box or None, captions)
IMAGES: dict[str, tuple[str, tuple[int, int, int, int] | None, list[str]]] = {
    "astronaut": ("astronaut.png", None, [
        "a smiling astronaut in an orange flight suit holding her helmet",
        "portrait of a woman astronaut with a flag and a space shuttle model behind her",
        "official portrait of an astronaut in a launch and entry suit",
    ]),
    "astronaut_shuttle": ("astronaut.png", (345, 0, 485, 290), [
        "a model of the space shuttle with its orange fuel tank",
        "a small white space shuttle model against a grey background",
    ]),
    "astronaut_helmet": ("astronaut.png", (270, 335, 512, 512), [
        "a shiny black astronaut helmet with a white rim",
        "close-up of a space helmet reflecting studio lights",
    ]),
    "brick": ("brick.png", None, [
        "a grey brick wall seen at an angle",
        "rows of bricks and mortar in black and white",
    ]),
    "camera": ("camera.png", None, [
        "a man in a dark coat looking through a camera on a tripod",
        "black and white photo of a cameraman filming on a grassy field",
        "a photographer with a tripod in a park, buildings in the distance",
    ]),
    "camera_skyline": ("camera.png", (330, 100, 512, 250), [
        "buildings and a domed roof behind a wide lawn",
        "a tall tower and low buildings seen across a field in black and white",
    ]),
    "cell": ("cell.png", None, [
        "a single round cell floating in liquid under a microscope",
        "grey microscopy image of a bright cell on a striped background",
    ]),
    "chelsea": ("chelsea.png", None, [
        "close-up of a tabby cat with green eyes",
        "a striped brown cat looking to the side",
        "the face of a cat with long white whiskers",
    ]),
    "chelsea_eyes": ("chelsea.png", (110, 60, 370, 175), [
        "the green eyes of a tabby cat",
        "close-up of a cat's eyes and striped fur",
    ]),
    "clock_motion": ("clock_motion.png", None, [
        "a wall clock blurred by camera motion",
        "a blurry round clock on a plain grey wall",
    ]),
    "coffee": ("coffee.png", None, [
        "a cup of espresso on a red saucer with a spoon",
        "a small coffee cup on a wooden table seen from above",
        "a red and white espresso cup with golden crema",
    ]),
    "coffee_spoon": ("coffee.png", (300, 200, 470, 340), [
        "a silver teaspoon resting on a red saucer",
        "close-up of a spoon next to a coffee cup",
    ]),
    "grass": ("grass.png", None, [
        "a patch of grass seen from above in black and white",
        "close-up texture of short grass blades and leaves",
    ]),
    "gravel": ("gravel.png", None, [
        "a close-up of grey gravel stones",
        "texture of small crushed rocks",
    ]),
    "hubble_deep_field": ("hubble_deep_field.jpg", None, [
        "thousands of distant galaxies in a deep space telescope image",
        "the Hubble extreme deep field full of colourful galaxies",
        "a black sky dotted with stars and galaxies",
    ]),
    "hubble_galaxy": ("hubble_deep_field.jpg", (600, 380, 1000, 680), [
        "a bright yellow galaxy and a star among many faint galaxies",
        "a glowing elliptical galaxy in a dark field of tiny galaxies",
    ]),
    "microaneurysms": ("microaneurysms.png", None, [
        "a grey close-up of blood vessels in the retina",
        "medical image of a detail of the retina with small dark spots",
    ]),
    "retina": ("retina.jpg", None, [
        "a fundus photograph of a human retina",
        "an orange circular image of the back of an eye with blood vessels",
        "medical photo of the retina of a healthy left eye",
    ]),
    "rocket": ("rocket.jpg", None, [
        "a rocket on the launch pad at dusk between tall towers",
        "a Falcon 9 rocket ready for launch under a blue evening sky",
        "a white rocket lit by floodlights at a launch site",
    ]),
    "rocket_closeup": ("rocket.jpg", (250, 110, 400, 410), [
        "close-up of a white rocket standing on the launch pad",
        "the nose of a rocket against a dark blue sky",
    ]),
    "text": ("text.png", None, [
        "handwritten mathematical formulas on a sheet of paper",
        "black and white photo of handwritten symbols seen at an angle",
    ]),
}  # fmt: skip


def make_images(skimage_data: Path) -> None:
    (HERE / "images").mkdir(exist_ok=True)
    rows = []
    for name, (src, box, captions) in IMAGES.items():
        im = Image.open(skimage_data / src)
        im = im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB")
        if box is not None:
            im = im.crop(box)
        short = min(im.size)
        if short > 256:
            scale = 256 / short
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
        im.save(HERE / "images" / f"{name}.jpg", quality=85, optimize=True)
        rows += [{"filepath": f"images/{name}.jpg", "title": c} for c in captions]
    with open(HERE / "captions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["filepath", "title"])
        writer.writeheader()
        writer.writerows(rows)


def prose_paragraphs(text: str, min_chars: int = 120) -> list[str]:
    """Unindented, non-heading paragraphs of a pydoc topic of at least ``min_chars``, each joined into one line."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or lines[0].startswith((" ", "*", "-", "+", "|", "[")):
            continue  # code, grammar, lists, tables, footnotes
        if len(lines) > 1 and re.fullmatch(r"[*=\-^~]+", lines[1].strip()):
            continue  # a heading
        para = " ".join(line.strip() for line in lines)
        if len(para) >= min_chars and "::=" not in para and ">>>" not in para:
            out.append(para)
    return out


def make_corpus(limit: int = 200_000) -> None:
    from pydoc_data.topics import topics

    docs, size = [], 0
    for name in sorted(topics):
        for para in prose_paragraphs(topics[name]):
            doc = "\n".join(split_sentences(para))
            docs.append(doc)
            size += len(doc) + 2
            if size >= limit:
                break
        if size >= limit:
            break
    (HERE / "corpus.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")


def main() -> None:
    import skimage

    make_images(Path(skimage.__file__).parent / "data")
    make_corpus()
    # the project's own tokenizer, rebuilt whole (train_tokenizer refuses a folder it did not mark as its own);
    # the corpus holds only ~4k distinct words, so every pair seen once may merge
    shutil.rmtree(HERE / "tokenizer", ignore_errors=True)
    train_tokenizer(
        [HERE / "corpus.txt"], vocab_size=6000, out_dir=HERE / "tokenizer", kind="wordpiece", min_frequency=1
    )


if __name__ == "__main__":
    main()

"""``mmlm explain``: heatmaps of a CLIP over an image, or token attributions of a text classifier.

Imports nothing heavy at module level: the CLI's ``--help`` reads this signature without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal


def explain(
    inputs: list[str],
    text: str | None = None,
    method: Literal["similarity", "rollout", "gradcam", "occlusion", "attention"] = "occlusion",
    out: Path | None = None,
    tokenizer: str | None = None,
    target: int | None = None,
    classes: list[str] | None = None,
    steps: int = 50,
    device: str = "cpu",
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Show where a CLIP finds each text in an image, or which tokens decide a text classifier.

    ``mmlm explain MODEL IMAGE "a cat" "a dog" --out heat.png`` writes the image and
    each text's heatmap with its cosine similarity; ``--method attention`` (MODEL IMAGE) the class-token
    attention of every layer and head; ``mmlm explain MODEL --text "..." --out why.html`` colours each
    token of a text classifier by its Integrated Gradients attribution (``.html`` or ``.png``).

    Args:
        inputs: MODEL, then IMAGE and one or more texts for a CLIP (IMAGE alone for ``--method attention``);
            MODEL alone with ``--text`` for a text classifier. MODEL is a preset name (random weights), an
            mmlm folder, a ``mmlm fit`` .ckpt, or any checkpoint ``mmlm.load_pretrained`` reads.
        text: the text a text classifier explains.
        method: ``occlusion`` (cosine drop when a region is painted over; the best in the pointing game),
            ``similarity`` (projected patch tokens vs the text), ``rollout`` (attention rollout), ``gradcam``
            (Grad-CAM of the image-text cosine) or ``attention`` (per-layer, per-head grid).
        out: the file to write; default ``explain.png`` (``explain.html`` for ``--text``); an existing
            file is refused unless ``--overwrite``.
        tokenizer: tokenizer name or folder; default the checkpoint's, else the CLIP BPE.
        target: the class ``--text`` explains; default the predicted one.
        classes: the classifier's class names in label order, for the heading.
        steps: Integrated Gradients steps (more: a smaller completeness delta).
        device: ``cpu``, ``cuda``, ...
        seed: seed of a preset's random weights.
        overwrite: replace the file ``out`` if it exists.
    """
    from mmlm import outputs
    from mmlm.errors import check_at_least, check_device
    from mmlm.factory import load

    if not inputs:
        raise ValueError("give MODEL, then IMAGE and texts (a CLIP) or --text (a text classifier)")
    spec, *rest = [str(i) for i in inputs]
    check_device(device)
    check_at_least(1, steps=steps)
    out = Path(out or ("explain.html" if text is not None else "explain.png"))
    outputs.check_file(out, overwrite)  # every mistake in what was typed is found before the model loads
    if text is not None:
        if rest:
            raise ValueError(f"--text explains a text classifier alone; drop {rest[0]!r} or drop --text")
        loaded = load(spec, tokenizer=tokenizer, device=device, seed=seed)
        return _explain_text(loaded, text, out, target, classes, steps, overwrite)
    image = _read_image(rest, method, out)
    loaded = load(spec, tokenizer=tokenizer, device=device, seed=seed)
    return _explain_image(loaded, image, rest[1:], method, out, overwrite)


def _read_image(rest: list[str], method: str, out: Path):
    """The image ``rest`` names (IMAGE, then the texts), refused with what is wrong in what was typed."""
    from PIL import Image

    from mmlm.errors import UsageError
    from mmlm.explain.render import open_image
    from mmlm.paths import resolve as resolve_path

    if not rest:
        raise UsageError("give IMAGE after MODEL, then the texts to find in it")
    image_path, texts = resolve_path(rest[0]), rest[1:]  # `assets/images/...` from any folder
    if not image_path.is_file():
        raise FileNotFoundError(f"image {image_path} does not exist")
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: heatmaps are written as PNG; name a .png file")
    if method != "attention" and not texts:
        raise UsageError(f"give one or more texts after the image {image_path} to find in it")
    try:
        return open_image(image_path)
    except Image.DecompressionBombError as e:  # Pillow's own limit on pixels, against decompression bombs
        raise UsageError(f"image {image_path}: {e}") from None


def _explain_image(loaded, image, texts: list[str], method: str, out: Path, overwrite: bool) -> Path:
    import torch

    from mmlm import outputs
    from mmlm.explain.heatmaps import attention_maps, heatmaps, image_tensor, text_embeddings
    from mmlm.explain.render import attention_figure, heatmap_figure
    from mmlm.models.clip import CLIP

    model, spec = loaded.model, loaded.spec
    if not isinstance(model, CLIP):
        raise ValueError(f"{spec} is a {type(model).__name__}: image heatmaps need a CLIP (a text classifier takes --text)")
    if method == "attention":
        figure = attention_figure(image, attention_maps(model, image))
    else:
        tok = loaded.require_tokenizer()
        maps = heatmaps(model, image, texts, method, tok)  # type: ignore[arg-type]
        with torch.no_grad():
            pixels = image_tensor(model.visual, image).to(model.logit_scale.device)
            cosines = (model.encode_image(pixels) @ text_embeddings(model, texts, tok).T)[0].tolist()
        for t, c in zip(texts, cosines):
            print(f"{c:+.3f}  {t}")
        figure = heatmap_figure(image, maps, [f"{t}\ncos {c:+.3f}" for t, c in zip(texts, cosines)])
    outputs.write_file(out, figure, overwrite)
    print(f"wrote {out}")
    return out


def _explain_text(loaded, text: str, out: Path, target: int | None, classes: list[str] | None, steps: int,
                  overwrite: bool) -> Path:  # fmt: skip
    from mmlm import outputs
    from mmlm.explain.render import tokens_html, tokens_png
    from mmlm.explain.text import check_classifier, token_attributions

    model, spec = loaded.model, loaded.spec
    try:
        check_classifier(model)
    except TypeError as e:
        raise ValueError(f"{spec}: {e}") from None
    tok = loaded.require_tokenizer()
    if classes is not None and len(classes) != model.cfg.num_labels:
        raise ValueError(f"--classes names {len(classes)} classes; the classifier has {model.cfg.num_labels}")
    if out.suffix.lower() not in (".html", ".png"):
        raise ValueError(f"--out {out}: token attributions are written as .html or .png")
    attr = token_attributions(model, tok, text, target, steps)
    name = classes[attr.target] if classes else f"class {attr.target}"
    print(f"{name}: p = {attr.probability:.3f}; completeness delta {attr.delta:+.1e}")
    ranked = sorted((v, t) for v, t, special in zip(attr.attributions.tolist(), attr.tokens, attr.special) if not special)
    print("tokens most for it: " + ", ".join(f"{t!r} {v:+.3f}" for v, t in ranked[::-1][:5]))
    page = tokens_html(attr, classes) if out.suffix.lower() == ".html" else tokens_png(attr, classes)
    outputs.write_file(out, page, overwrite)
    print(f"wrote {out}")
    return out

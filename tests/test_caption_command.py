"""``mmlm caption``: one line per image, through the CLI's own parser; a model that cannot caption is refused."""

from __future__ import annotations

import pytest

from mmlm.cli import main
from mmlm.paths import ASSETS

IMAGES = sorted((ASSETS / "images").glob("*.jpg"))[:2]


@pytest.mark.slow  # a CLIP-vocabulary CoCa generating with beams: ~5 s alone, far more on a busy CPU
def test_captions_one_line_per_image(capsys):
    main(["caption", "coca-tiny", *map(str, IMAGES), "--max-new-tokens", "4", "--num-beams", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in IMAGES]
    assert all(len(line.split("\t")[1].split()) >= 1 for line in lines)  # a random model's words, but words


def test_a_clip_cannot_caption(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["caption", "clip-tiny", str(IMAGES[0])])
    assert exit_.value.code == 2
    assert "captions need a CoCa" in capsys.readouterr().err

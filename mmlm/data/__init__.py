"""mmlm's data layer: tokenizers, image transforms, datasets, collators, data modules.

Bad samples (missing, empty, corrupt or oversized images, empty or non-text
captions, broken shards) are skipped and counted per reason, never fatal:
see ``mmlm.data.skips``.

The names below are imported on first use (PEP 562), so that a process that needs a tokenizer or a
transform (``mmlm serve``) does not load Lightning with the data modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmlm._lazy import lazy_exports

# public name -> the module that defines it
_EXPORTS = {
    "ASSETS": "mmlm.paths",
    "CLMCollator": "mmlm.data.collators",
    "CLMDataset": "mmlm.data.text_datasets",
    "DIGIT_CLASSNAMES": "mmlm.data.digits",
    "DIGIT_TEMPLATES": "mmlm.data.digits",
    "DigitsImageText": "mmlm.data.digits",
    "IGNORE": "mmlm.data.collators",
    "ImageClassificationCollator": "mmlm.data.collators",
    "ImageClassificationDataModule": "mmlm.data.image_datamodules",
    "ImageClassificationDataset": "mmlm.data.image_datasets",
    "ImageTextCollator": "mmlm.data.collators",
    "ImageTextDataModule": "mmlm.data.image_datamodules",
    "ImageTextDataset": "mmlm.data.image_datasets",
    "ImageTextShards": "mmlm.data.webdataset",
    "LanguageModelingDataModule": "mmlm.data.text_datamodules",
    "MLMCollator": "mmlm.data.collators",
    "MLMDataset": "mmlm.data.text_datasets",
    "NSPDataset": "mmlm.data.text_datasets",
    "QACollator": "mmlm.data.collators",
    "QuestionAnsweringDataModule": "mmlm.data.text_datamodules",
    "ReplaceBad": "mmlm.data.skips",
    "Skip": "mmlm.data.skips",
    "SkipStats": "mmlm.data.skips",
    "SkippingDataLoader": "mmlm.data.skips",
    "SquadDataset": "mmlm.data.text_datasets",
    "TextClassificationCollator": "mmlm.data.collators",
    "TextClassificationDataModule": "mmlm.data.text_datamodules",
    "TextClassificationDataset": "mmlm.data.text_datasets",
    "TokenClassificationCollator": "mmlm.data.collators",
    "TokenClassificationDataModule": "mmlm.data.text_datamodules",
    "TokenClassificationDataset": "mmlm.data.text_datasets",
    "Tokenizer": "mmlm.data.tokenizers",
    "clip_tokenizer": "mmlm.data.tokenizers",
    "digits_image_text": "mmlm.data.digits",
    "document_attention_mask": "mmlm.data.collators",
    "extract_answers": "mmlm.data.text_datasets",
    "get_tokenizer": "mmlm.data.tokenizers",
    "image_transform": "mmlm.data.transforms",
    "load_image": "mmlm.data.skips",
    "mask_tokens": "mmlm.data.collators",
    "pad_sequences": "mmlm.data.collators",
    "read_conll": "mmlm.data.text_datasets",
    "read_documents": "mmlm.data.text_datasets",
    "read_manifest": "mmlm.data.manifest",
    "split_sentences": "mmlm.data.text_datasets",
    "text_config": "mmlm.data.transforms",
    "train_tokenizer": "mmlm.data.tokenizers",
    "vision_config": "mmlm.data.transforms",
    "write_clip_benchmark_wds": "mmlm.data.digits",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from mmlm.data.collators import (
        IGNORE,
        CLMCollator,
        ImageClassificationCollator,
        ImageTextCollator,
        MLMCollator,
        QACollator,
        TextClassificationCollator,
        TokenClassificationCollator,
        document_attention_mask,
        mask_tokens,
        pad_sequences,
    )
    from mmlm.data.digits import (
        DIGIT_CLASSNAMES,
        DIGIT_TEMPLATES,
        DigitsImageText,
        digits_image_text,
        write_clip_benchmark_wds,
    )
    from mmlm.data.image_datamodules import ImageClassificationDataModule, ImageTextDataModule
    from mmlm.data.image_datasets import ImageClassificationDataset, ImageTextDataset
    from mmlm.data.manifest import read_manifest
    from mmlm.data.skips import ReplaceBad, Skip, SkippingDataLoader, SkipStats, load_image
    from mmlm.data.text_datamodules import (
        LanguageModelingDataModule,
        QuestionAnsweringDataModule,
        TextClassificationDataModule,
        TokenClassificationDataModule,
    )
    from mmlm.data.text_datasets import (
        CLMDataset,
        MLMDataset,
        NSPDataset,
        SquadDataset,
        TextClassificationDataset,
        TokenClassificationDataset,
        extract_answers,
        read_conll,
        read_documents,
        split_sentences,
    )
    from mmlm.data.tokenizers import Tokenizer, clip_tokenizer, get_tokenizer, train_tokenizer
    from mmlm.data.transforms import image_transform, text_config, vision_config
    from mmlm.data.webdataset import ImageTextShards
    from mmlm.paths import ASSETS


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

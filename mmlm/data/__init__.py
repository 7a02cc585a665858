"""mmlm's data layer: tokenizers, image transforms, datasets, collators, data modules.

Bad samples (missing, empty, corrupt or oversized images, empty or non-text
captions, broken shards) are skipped and counted per reason, never fatal:
see ``mmlm.data.skips``.
"""

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
from mmlm.data.datamodules import (
    ImageClassificationDataModule,
    ImageTextDataModule,
    LanguageModelingDataModule,
    QuestionAnsweringDataModule,
    TextClassificationDataModule,
    TokenClassificationDataModule,
)
from mmlm.data.digits import (
    DIGIT_CLASSNAMES,
    DIGIT_TEMPLATES,
    DigitsImageText,
    digits_image_text,
    write_clip_benchmark_wds,
)
from mmlm.data.image_datasets import ImageClassificationDataset, ImageTextDataset
from mmlm.data.manifest import read_manifest
from mmlm.data.skips import ReplaceBad, Skip, SkippingDataLoader, SkipStats, load_image
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

__all__ = [
    "ASSETS",
    "CLMCollator",
    "CLMDataset",
    "DIGIT_CLASSNAMES",
    "DIGIT_TEMPLATES",
    "DigitsImageText",
    "IGNORE",
    "ImageClassificationCollator",
    "ImageClassificationDataModule",
    "ImageClassificationDataset",
    "ImageTextCollator",
    "ImageTextDataModule",
    "ImageTextDataset",
    "ImageTextShards",
    "LanguageModelingDataModule",
    "MLMCollator",
    "MLMDataset",
    "NSPDataset",
    "QACollator",
    "QuestionAnsweringDataModule",
    "ReplaceBad",
    "Skip",
    "SkipStats",
    "SkippingDataLoader",
    "SquadDataset",
    "TextClassificationCollator",
    "TextClassificationDataModule",
    "TextClassificationDataset",
    "TokenClassificationCollator",
    "TokenClassificationDataModule",
    "TokenClassificationDataset",
    "Tokenizer",
    "clip_tokenizer",
    "digits_image_text",
    "document_attention_mask",
    "extract_answers",
    "get_tokenizer",
    "image_transform",
    "load_image",
    "mask_tokens",
    "pad_sequences",
    "read_conll",
    "read_documents",
    "read_manifest",
    "split_sentences",
    "text_config",
    "train_tokenizer",
    "vision_config",
    "write_clip_benchmark_wds",
]

"""One LightningDataModule per benchmark, all on ``BenchmarkDataModule`` (see ``datamodules/base.py``).

Layout: ``keys.py`` (batch key names and data modes — the only module ``lit_align`` and ``callbacks`` import),
``readers.py`` (raw rows and their validation errors), ``collation.py`` (tokenization, padding, batches),
``base.py`` (``BenchmarkDataModule``: splits, data modes, the ``attach`` hand-off, loaders), one file per benchmark.
"""

from datamodules.base import BenchmarkDataModule, NotAttachedError
from datamodules.controlled import ControlledGenerationDataModule
from datamodules.hh import HHDataModule
from datamodules.imdb import IMDBDataModule
from datamodules.keys import (
    ATTENTION_MASK,
    CHOSEN,
    CHOSEN_ATTENTION_MASK,
    CHOSEN_COMPLETION_MASK,
    CHOSEN_INPUT_IDS,
    COMPLETION,
    COMPLETION_MASK,
    DATA_MODES,
    INDEX,
    INPUT_IDS,
    KL_ATTENTION_MASK,
    KL_COMPLETION_MASK,
    KL_INPUT_IDS,
    LABEL,
    PROMPT,
    PROMPT_ATTENTION_MASK,
    PROMPT_INPUT_IDS,
    REFERENCE,
    REJECTED,
    REJECTED_ATTENTION_MASK,
    REJECTED_COMPLETION_MASK,
    REJECTED_INPUT_IDS,
    SPLITS,
    TEXT,
)
from datamodules.multi30k import PivotTranslationDataModule
from datamodules.readers import DataValidationError, SkipRow
from datamodules.stackexchange import StackExchangeDataModule
from datamodules.tldr import TLDRDataModule
from datamodules.trl_formats import TRLFormatDataModule
from datamodules.ultrafeedback import UltraFeedbackDataModule

__all__ = [
    "ATTENTION_MASK",
    "CHOSEN",
    "CHOSEN_ATTENTION_MASK",
    "CHOSEN_COMPLETION_MASK",
    "CHOSEN_INPUT_IDS",
    "COMPLETION",
    "COMPLETION_MASK",
    "DATA_MODES",
    "INDEX",
    "INPUT_IDS",
    "KL_ATTENTION_MASK",
    "KL_COMPLETION_MASK",
    "KL_INPUT_IDS",
    "LABEL",
    "PROMPT",
    "PROMPT_ATTENTION_MASK",
    "PROMPT_INPUT_IDS",
    "REFERENCE",
    "REJECTED",
    "REJECTED_ATTENTION_MASK",
    "REJECTED_COMPLETION_MASK",
    "REJECTED_INPUT_IDS",
    "SPLITS",
    "TEXT",
    "BenchmarkDataModule",
    "ControlledGenerationDataModule",
    "DataValidationError",
    "HHDataModule",
    "IMDBDataModule",
    "NotAttachedError",
    "PivotTranslationDataModule",
    "SkipRow",
    "StackExchangeDataModule",
    "TLDRDataModule",
    "TRLFormatDataModule",
    "UltraFeedbackDataModule",
]

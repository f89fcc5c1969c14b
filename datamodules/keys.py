"""The names a batch and a canonical record use: the one module of ``datamodules`` that ``lit_align`` and
``callbacks`` import (``lit_align.cli`` excepted).

Owns the string constants only — no torch, no Lightning, nothing else of ours — so the modules that consume batches
depend on the vocabulary of a batch, never on how a DataModule reads, tokenizes or collates (``readers.py``,
``collation.py``, ``base.py``). Import the constants; never spell the strings.

A batch is a dict of tensors (``*_INPUT_IDS``, ``*_ATTENTION_MASK``, ``*_COMPLETION_MASK``, ``LABEL``, ``INDEX``) plus
lists of the records' untruncated strings (``PROMPT``, ``CHOSEN``, ``REJECTED``, ``COMPLETION``, ``REFERENCE``,
``TEXT``). Which keys a batch holds depends on its data mode (``DATA_MODES``; see ``datamodules/base.py``):

========== ==================================================================================================
mode       tensors
========== ==================================================================================================
prompt     ``PROMPT_INPUT_IDS``, ``PROMPT_ATTENTION_MASK`` (left-padded, for generation)
pair       ``CHOSEN_*`` and ``REJECTED_*`` ids / attention / completion masks (right-padded, one common width)
unpaired   ``INPUT_IDS``, ``ATTENTION_MASK``, ``COMPLETION_MASK``, ``LABEL`` (bool) and the mismatched ``KL_*``
text       ``INPUT_IDS``, ``ATTENTION_MASK``, ``COMPLETION_MASK``
========== ==================================================================================================

Every batch also has ``INDEX``: a LongTensor [B], the position of each record in its split's dataset.
"""

from __future__ import annotations

# ---- tensors in a batch --------------------------------------------------------------------------------
PROMPT_INPUT_IDS = "prompt_input_ids"
PROMPT_ATTENTION_MASK = "prompt_attention_mask"
CHOSEN_INPUT_IDS = "chosen_input_ids"
CHOSEN_ATTENTION_MASK = "chosen_attention_mask"
CHOSEN_COMPLETION_MASK = "chosen_completion_mask"
REJECTED_INPUT_IDS = "rejected_input_ids"
REJECTED_ATTENTION_MASK = "rejected_attention_mask"
REJECTED_COMPLETION_MASK = "rejected_completion_mask"
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
COMPLETION_MASK = "completion_mask"
LABEL = "label"
KL_INPUT_IDS = "kl_input_ids"
KL_ATTENTION_MASK = "kl_attention_mask"
KL_COMPLETION_MASK = "kl_completion_mask"
INDEX = "index"  # LongTensor [B]: position of the record in its split's dataset (stable across epochs)

# ---- record fields, also carried in batches as string lists ------------------------------------------------
PROMPT = "prompt"
CHOSEN = "chosen"
REJECTED = "rejected"
COMPLETION = "completion"
REFERENCE = "reference"
TEXT = "text"
# Prompt-mode records of your own data (``TRLFormatDataModule``) may also carry, and batches then hold:
PROMPT_MESSAGES = "prompt_messages"  # a conversational prompt's {role, content} messages (TRL passes these)
EXTRA_COLUMNS = "extra_columns"  # a record's other columns ({name: value}); a batch holds each as a list by its name
# the keyword arguments TRL's reward functions get besides those columns (GRPO calls them so): no column may use them
REWARD_FUNCTION_ARGUMENTS = ("prompts", "completions", "completion_ids")

# ---- data modes and split roles ------------------------------------------------------------------------
DATA_MODES = ("prompt", "pair", "unpaired", "text")
SPLITS = ("train", "val")  # the roles a datamodule serves; "validation" and "test" are accepted as "val"

__all__ = [
    "ATTENTION_MASK",
    "CHOSEN",
    "CHOSEN_ATTENTION_MASK",
    "CHOSEN_COMPLETION_MASK",
    "CHOSEN_INPUT_IDS",
    "COMPLETION",
    "COMPLETION_MASK",
    "DATA_MODES",
    "EXTRA_COLUMNS",
    "INDEX",
    "INPUT_IDS",
    "KL_ATTENTION_MASK",
    "KL_COMPLETION_MASK",
    "KL_INPUT_IDS",
    "LABEL",
    "PROMPT",
    "PROMPT_ATTENTION_MASK",
    "PROMPT_INPUT_IDS",
    "PROMPT_MESSAGES",
    "REFERENCE",
    "REJECTED",
    "REJECTED_ATTENTION_MASK",
    "REJECTED_COMPLETION_MASK",
    "REJECTED_INPUT_IDS",
    "REWARD_FUNCTION_ARGUMENTS",
    "SPLITS",
    "TEXT",
]

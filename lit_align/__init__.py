"""lit-align: Lightning modules for aligning language models with a measured, low alignment tax."""

from lit_align.base import AlignmentModule
from lit_align.distribution_matching import DistributionMatchingModule
from lit_align.dpo import DPOModule
from lit_align.generation import SamplingSettings
from lit_align.grpo import GRPOModule
from lit_align.kto import KTOModule
from lit_align.logprobs import sequence_logprobs, token_logprobs
from lit_align.models import EMBEDDED_MODEL, TINY_MODEL, LoraSettings, load_causal_lm, load_tokenizer
from lit_align.ppo import PPOModule
from lit_align.reward_model import RewardModelModule
from lit_align.sft import SFTModule

__all__ = [
    "EMBEDDED_MODEL",
    "TINY_MODEL",
    "AlignmentModule",
    "DPOModule",
    "DistributionMatchingModule",
    "GRPOModule",
    "KTOModule",
    "LoraSettings",
    "PPOModule",
    "RewardModelModule",
    "SFTModule",
    "SamplingSettings",
    "load_causal_lm",
    "load_tokenizer",
    "sequence_logprobs",
    "token_logprobs",
]

"""SFT, DPO, KTO, PPO (GAE), RLOO, GRPO and distribution matching for two optimizer steps on one process, under DDP
or under FSDP2, with or without LoRA; rank 0 writes each module's synced epoch metrics and its full final weights to
OUT_DIR/<module>-<strategy>[-lora]-<world size>.{json,pt}. Under FSDP2 each module is also resumed from the
sharded checkpoint of step 1 (``...-resumed-...``).

    python scale_modules.py OUT_DIR DATA_DIR STRATEGY [lora|-] [MODULES]   (STRATEGY: single, ddp or fsdp2;
                                                                            MODULES: comma-separated, default all)

Multi-process runs are started by the test like torchrun does. Every epoch is one optimizer step on the same
global batch on 1 and 2 processes. The data has one shared prompt, so KTO's mismatched KL pairs (built inside each
rank's batch) give the same z_ref on any number of ranks.

Sampling: each completion is drawn with its own seed (step, dataset row, sample number) by the real policy, one
row at a time (``RowSeededSampling``), so one process and two processes sample the same completions and the
comparison tests the distributed training math; each completion is cut to a length of its own ending in EOS
(``end_early``), so ranks hold different numbers of tokens. Sharded generation itself goes through the module's own
``generate_responses`` (synced forward calls, weights gathered once per call).
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from common import RANK_ZERO, WORLD_SIZE, hh_pairs, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lit_align import DistributionMatchingModule, DPOModule, GRPOModule, KTOModule, PPOModule, SFTModule
from lit_align.ebm import KLControlTarget
from lit_align.rewards import LexiconSentimentReward

PAIRS = 4  # rows of the data file; one epoch = one global batch


def end_early(response: torch.Tensor, seed: int, eos_token_id: int) -> torch.Tensor:
    """The response cut to a length of 2 or more that varies with the seed, ending in EOS. The random tiny-llama
    never samples EOS, so every response would fill max_new_tokens, every rank would hold the same number of tokens,
    and a loss normalised by one rank's tokens instead of the global count would still match one process."""
    if len(response) <= 2:
        return response
    length = 2 + int(torch.randint(len(response) - 1, (1,), generator=torch.Generator().manual_seed(seed)))
    return torch.cat([response[: length - 1], response.new_tensor([eos_token_id])])


class RowSeededSampling:
    """Mixin: sample every row with a seed of its own, so the samples do not depend on how rows meet ranks."""

    def generate_responses(self, model: nn.Module, prompt_ids, prompt_mask, sampling):
        rows = self._batch_index.tolist()
        per_row = prompt_ids.shape[0] // len(rows)
        responses = []
        for i in range(prompt_ids.shape[0]):
            keep = prompt_mask[i].bool()
            seed = 10_000 * self.global_step + 100 * rows[i // per_row] + i % per_row
            torch.manual_seed(seed)
            sequence, _, response_mask = super().generate_responses(
                model, prompt_ids[i : i + 1, keep], prompt_mask[i : i + 1, keep], sampling
            )
            response = sequence[0, int(keep.sum()) :][: int(response_mask.sum())]
            responses.append(end_early(response, seed, self.tokenizer.eos_token_id))
        width = max(len(r) for r in responses)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        padded = torch.full((len(responses), width), pad, dtype=prompt_ids.dtype, device=prompt_ids.device)
        response_mask = torch.zeros_like(padded)
        for i, response in enumerate(responses):
            padded[i, : len(response)], response_mask[i, : len(response)] = response, 1
        sequences = torch.cat([prompt_ids, padded], dim=1)
        return sequences, torch.cat([prompt_mask, response_mask], dim=1), response_mask


class SeededPPO(RowSeededSampling, PPOModule):
    pass


class SeededGRPO(RowSeededSampling, GRPOModule):
    pass


class SeededDistributionMatching(RowSeededSampling, DistributionMatchingModule):
    pass


def make_module(name: str, lora: bool) -> tuple[L.LightningModule, str, int]:
    """The module, the DataModule's mode and the rows one epoch (= one global batch) has in that mode."""
    common = dict(model="tiny-llama", learning_rate=1e-3, lr_scheduler="constant")
    if lora:
        common["lora"] = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    sampling = dict(sampling={"max_new_tokens": 6}, drift_texts=0)
    if name == "sft":
        return SFTModule(**common), "text", PAIRS
    if name == "dpo":
        return DPOModule(**common), "pair", PAIRS
    if name == "kto":
        return KTOModule(**common), "unpaired", 2 * PAIRS
    if name == "ppo":
        return SeededPPO(LexiconSentimentReward(), advantage_estimator="gae", ppo_epochs=2,
                         gradient_accumulation_steps=2, **sampling, **common), "prompt", PAIRS  # fmt: skip
    if name == "rloo":
        return SeededPPO(LexiconSentimentReward(), advantage_estimator="rloo", samples_per_prompt=2, ppo_epochs=2,
                         **sampling, **common), "prompt", PAIRS  # fmt: skip
    if name == "grpo":  # μ = 2 iterations: the second update's ratio is not 1, so the clipped surrogate is exercised
        grpo = SeededGRPO(LexiconSentimentReward(), num_generations=2, num_iterations=2, **sampling, **common)
        return grpo, "prompt", PAIRS
    if name == "dm":
        target = KLControlTarget(LexiconSentimentReward(), beta=0.5)
        return (
            SeededDistributionMatching(target, sampling={"max_new_tokens": 6}, proposal_update_every=1, **common),
            "prompt",
            PAIRS,
        )
    raise ValueError(name)


def run(name: str, strategy: str, data_dir: str, lora: bool, max_steps: int, callbacks=(), ckpt_path=None):
    L.seed_everything(0)
    module, mode, rows = make_module(name, lora)
    data = hh_pairs(data_dir, global_batch=rows, holdout=0, limit_train=None, max_length=40, mode=mode)
    trainer = quiet_trainer(strategy, max_steps, callbacks)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    assert len(data.train_dataloader().dataset) == rows, (name, len(data.train_dataloader().dataset))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if not k.startswith("time/")}
    return module, metrics


def full_state(module: L.LightningModule) -> dict[str, torch.Tensor]:
    """Every weight of the module (policy, reference, value head, proposal), gathered whole (a collective)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {k: v for k, v in get_model_state_dict(module, options=options).items() if torch.is_tensor(v)}


if __name__ == "__main__":
    out_dir, data_dir, strategy = sys.argv[1:4]
    lora = len(sys.argv) > 4 and sys.argv[4] == "lora"
    out = Path(out_dir)
    for name in sys.argv[5].split(",") if len(sys.argv) > 5 else ("sft", "dpo", "kto", "ppo", "rloo", "grpo", "dm"):
        tag = f"{name}-{strategy}{'-lora' if lora else ''}-{WORLD_SIZE}"
        per_batch = make_module(name, lora)[0].optimizer_steps_per_batch()  # PPO: ppo_epochs optimizer steps
        checkpoints = ModelCheckpoint(dirpath=out / f"{tag}-ckpt", every_n_train_steps=per_batch, save_top_k=-1)
        callbacks = [checkpoints] if strategy == "fsdp2" else []
        module, metrics = run(name, strategy, data_dir, lora, 2 * per_batch, callbacks)
        state = full_state(module)
        if RANK_ZERO:
            torch.save(state, out / f"{tag}.pt")
            (out / f"{tag}.json").write_text(json.dumps(metrics))
        if strategy == "fsdp2":
            checkpoint = out / f"{tag}-ckpt" / f"epoch=0-step={per_batch}.ckpt"
            resumed, _ = run(name, strategy, data_dir, lora, 2 * per_batch, ckpt_path=str(checkpoint))
            resumed_state = full_state(resumed)
            if RANK_ZERO:
                torch.save(resumed_state, out / f"{tag}-resumed.pt")

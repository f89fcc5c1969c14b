"""A callback that records the raw weights around every optimizer step, for tests of weight callbacks."""

from __future__ import annotations

import lightning as L
import torch


class Recorder(L.Callback):
    """Placed before the callback under test: the raw weights right before and after each optimizer step."""

    def __init__(self) -> None:
        self.before: list[dict[str, torch.Tensor]] = []
        self.after: list[dict[str, torch.Tensor]] = []

    def on_configure_model(self, trainer, pl_module) -> None:
        if not self.before and not self.after:
            self.initial = snapshot(pl_module.policy)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before.append(snapshot(pl_module.policy))

    def on_after_optimizer_step(self, trainer, pl_module) -> None:
        self.after.append(snapshot(pl_module.policy))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}

"""The exponential moving average of the denoiser's weights (what sampling and export use)."""

import copy

import torch
from torch import nn


class EMA:
    """An exponential moving average of a module's parameters (buffers are copied).

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so early averages
    are not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        ema_params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        """:meth:`state_dict`'s output; without ``"model"`` (a sharded checkpoint's: its shards hold the
        weights) the counters alone."""
        if "model" in state:
            self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
        self.decay = float(state["decay"])

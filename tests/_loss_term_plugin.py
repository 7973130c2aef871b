"""A loss term registered from outside `distill` (as a researcher's module would): the tests import
this to check that the registry, `DistillLoss` and `distill.fit` treat it like a built-in term."""

import torch

from distill.losses import LossInputs, LossTerm, register_loss_term, weighted_mean


@register_loss_term("test_mean_probability")
class MeanProbability(LossTerm):
    """Mean student probability**power inside the ROI (a made-up term)."""

    def __init__(self, power: float = 1.0):
        super().__init__()
        self.power = power

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        return weighted_mean(inputs.probs**self.power, inputs.roi)

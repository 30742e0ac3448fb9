"""What a data-aware method learns from a layer's inputs, accumulated over the calibration
samples by hooks on the target modules: CorDA's covariance, computed as PEFT's
`preprocess_corda` computes it (each sample scaled by |max| of its own input, X^T X summed
in float32, divided by the number of samples), once for modules that share an input."""

from __future__ import annotations

import torch
from torch import nn


class CovarianceHooks:
    """Forward hooks on `modules` (name -> module of one decoder layer) that sum each
    sample's input covariance; padding never counts (`lengths` of the batch's samples)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.sums: dict[str, torch.Tensor] = {}  # a module's key (the first of the modules sharing its input)
        self.key: dict[str, str] = {}
        self.samples = 0
        self._inputs: dict[str, torch.Tensor] = {}
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            self._inputs[name] = args[0]
        return hook

    def add_batch(self, lengths: list[int]) -> None:
        """Fold the batch the layer just ran into the sums: a sample's rows beyond its length
        are padding."""
        seen: list[tuple[torch.Tensor, str]] = []
        for name, x in self._inputs.items():
            owner = next((key for other, key in seen if other is x), None)
            if owner is not None:  # q/k/v, gate/up: the same input tensor, one covariance
                self.key.setdefault(name, owner)
                continue
            seen.append((x, name))
            self.key.setdefault(name, name)
            key = self.key[name]
            total = self.sums.get(key)
            for row, length in enumerate(lengths):
                sample = x[row, :length].float()
                sample = sample / torch.max(sample).abs()  # PEFT's normalization, per sample
                if torch.isnan(sample).any() or torch.isinf(sample).any():
                    raise ValueError(f"calibration: non-finite input to {name} (sample {self.samples + row} of "
                                     "the batch's first)")
                covariance = sample.T @ sample
                total = covariance if total is None else total + covariance
            self.sums[key] = total
        self.samples += len(lengths)
        self._inputs.clear()

    def covariances(self) -> dict[str, torch.Tensor]:
        """Each module's covariance, the mean over samples (shared between modules of one input)."""
        means = {key: total / self.samples for key, total in self.sums.items()}
        return {name: means[key] for name, key in self.key.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

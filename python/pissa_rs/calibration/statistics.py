"""What a data-aware method learns from a layer's inputs, accumulated over the calibration
samples by hooks on the target modules: CorDA's covariance, computed as PEFT's
`preprocess_corda` computes it (each sample scaled by |max| of its own input, X^T X summed
in float32, divided by the number of samples), and EVA's principal components, PEFT's own
SVDHook (incremental PCA) fed batch after batch until they converge; once for modules that
share an input."""

from __future__ import annotations

import torch
from torch import nn


def _shared(inputs: dict[str, torch.Tensor]) -> dict[str, str]:
    """Each module -> the first module given the same input tensor (q/k/v, gate/up)."""
    seen: list[tuple[torch.Tensor, str]] = []
    owner = {}
    for name, x in inputs.items():
        first = next((key for other, key in seen if other is x), None)
        if first is None:
            seen.append((x, name))
        owner[name] = first or name
    return owner


def _recording_inputs(modules: dict[str, nn.Module], inputs: dict[str, torch.Tensor]) -> list:
    """Forward hooks that keep each module's input tensor in `inputs` by name; their handles."""
    def recorder(name: str):
        def hook(module, args, output):
            inputs[name] = args[0]
        return hook

    return [module.register_forward_hook(recorder(name)) for name, module in modules.items()]


class CovarianceHooks:
    """Forward hooks on `modules` (name -> module of one decoder layer) that sum each
    sample's input covariance; padding never counts (`lengths` of the batch's samples)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.sums: dict[str, torch.Tensor] = {}  # a module's key (the first of the modules sharing its input)
        self.key: dict[str, str] = {}
        self.samples = 0
        self._inputs: dict[str, torch.Tensor] = {}
        self._handles = _recording_inputs(modules, self._inputs)

    def add_batch(self, lengths: list[int]) -> None:
        """Fold the batch the layer just ran into the sums: a sample's rows beyond its length
        are padding."""
        owner = _shared(self._inputs)
        for name, x in self._inputs.items():
            self.key.setdefault(name, owner[name])
            if owner[name] != name:  # q/k/v, gate/up: the same input tensor, one covariance
                continue
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


class ComponentHooks:
    """EVA: PEFT's SVDHook on one module of each shared input, `components` wanted of each;
    a hook stops taking batches once the components it needs have converged (cosine
    similarity >= tau between two steps), as PEFT's loop removes it."""

    def __init__(self, modules: dict[str, nn.Module], components: dict[str, int], tau: float):
        self.modules, self.components, self.tau = modules, components, tau
        self.owner: dict[str, str] | None = None  # set by the first batch
        self.svd: dict[str, object] = {}
        self._inputs: dict[str, torch.Tensor] = {}
        self._probe = _recording_inputs(modules, self._inputs)
        self._handles: dict[str, object] = {}

    def wants_more(self) -> bool:
        if self.owner is None:
            return True
        return any(not bool(torch.all(h.converged[: self.components[n]])) for n, h in self.svd.items())

    def before_batch(self, mask: torch.Tensor) -> None:
        """The batch's valid positions, for PEFT's prepare_layer_inputs_fn; hooks that have
        converged are taken off (PEFT's loop checks before each forward)."""
        for name, hook in self.svd.items():
            done = bool(torch.all(hook.converged[: self.components[name]]))
            if done and name in self._handles:
                self._handles.pop(name).remove()
            hook.model_input = mask.bool().nonzero()

    def after_batch(self, mask: torch.Tensor) -> None:
        if self.owner is None:  # the first batch: which modules share an input, then PEFT's hooks on one each
            from peft.tuners.lora.eva import SVDHook, prepare_layer_inputs_fn_language_modeling

            self.owner = _shared(self._inputs)
            for handle in self._probe:
                handle.remove()
            for name in self.modules:
                owner = self.owner[name]
                self.components[owner] = max(self.components[owner], self.components[name])
            for name, module in self.modules.items():
                if self.owner[name] != name:
                    continue
                hook = SVDHook(n_components=self.components[name], sim_thresh=self.tau, name=name,
                               prepare_layer_inputs_fn=prepare_layer_inputs_fn_language_modeling,
                               gather_distributed_inputs=False)
                hook.model_input = mask.bool().nonzero()
                hook(module, (self._inputs[name],), None)  # PEFT's loop feeds its first batch too
                self.svd[name] = hook
                self._handles[name] = module.register_forward_hook(hook)
        self._inputs.clear()

    def results(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Each module's (components, explained variance ratios, singular values), its input's."""
        found = {}
        for name in self.modules:
            hook = self.svd[self.owner[name]]
            if not hasattr(hook.svd, "components_"):
                raise ValueError(f"calibration: {name} never saw a batch with {hook.n_components} tokens or more")
            if not bool(torch.all(hook.converged[: self.components[name]])):
                raise ValueError(f"calibration: {name}'s {self.components[name]} components did not converge "
                                 f"(tau {self.tau}); give more calibration samples")
            found[name] = (hook.svd.components_, hook.svd.explained_variance_ratio_, hook.svd.singular_values_)
        return found

    def remove(self) -> None:
        for handle in [*self._probe, *self._handles.values()]:
            handle.remove()
        self._handles.clear()

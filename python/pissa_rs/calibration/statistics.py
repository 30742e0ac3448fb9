"""What a data-aware method learns from a layer's inputs, accumulated over the calibration
samples by hooks on the target modules: CorDA's covariance, computed as PEFT's
`preprocess_corda` computes it (each sample scaled by |max| of its own input, X^T X summed
in float32, divided by the number of samples), once for modules that share an input; and
which modules share an input (EVA's hooks, engine/components.py, take it once too)."""

from __future__ import annotations

import torch
from torch import nn


def input_owners(inputs: dict[str, torch.Tensor]) -> dict[str, str]:
    """Each module -> the first module given the same input tensor (q/k/v, gate/up)."""
    seen: list[tuple[torch.Tensor, str]] = []
    owner = {}
    for name, x in inputs.items():
        first = next((key for other, key in seen if other is x), None)
        if first is None:
            seen.append((x, name))
        owner[name] = first or name
    return owner


def recording_inputs(modules: dict[str, nn.Module], inputs: dict[str, torch.Tensor]) -> list:
    """Forward hooks that keep each module's input tensor in `inputs` by name; their handles."""
    def recorder(name: str):
        def hook(module, args, output):
            inputs[name] = args[0]
        return hook

    return [module.register_forward_hook(recorder(name)) for name, module in modules.items()]


def one_row_per_token(x: torch.Tensor) -> torch.Tensor:
    """A layer input as [batch, tokens, dim]: a latent viewed as one head ([B, 1, T, d]:
    MLA's kv_b_proj input in DeepSeek-V3, which PEFT's CorDA hook and EVA's input selection
    cannot take) is the [B, T, d] it is; any other input is returned as it is."""
    return x[:, 0] if x.dim() == 4 and x.shape[1] == 1 else x


def _sample_covariance(sample: torch.Tensor, where: str) -> torch.Tensor:
    """One sample's X^T X after PEFT's normalization (by |max| of the sample's own input)."""
    sample = sample.float()
    sample = sample / torch.max(sample).abs()
    if torch.isnan(sample).any() or torch.isinf(sample).any():
        raise ValueError(f"calibration: non-finite input to {where}")
    return sample.T @ sample


def is_routed_experts(module: nn.Module) -> bool:
    """A stack of experts as transformers' use_experts_implementation builds it: its forward
    takes (tokens, top_k_index, top_k_weights), and its attributes say how to apply it."""
    return all(hasattr(module, a) for a in ("num_experts", "has_gate", "has_bias", "is_transposed", "down_proj"))


def _expert_up(experts: nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
    """Expert e's gated intermediate activation for tokens x: the input of its down_proj,
    computed as transformers' batched experts forward computes it, for any such stack."""
    weight = experts.gate_up_proj[e] if experts.has_gate else experts.up_proj[e]
    h = x @ weight if experts.is_transposed else x @ weight.T
    if experts.has_bias:
        h = h + (experts.gate_up_proj_bias[e] if experts.has_gate else experts.up_proj_bias[e])
    return experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)


class CovarianceHooks:
    """Forward hooks on one decoder layer that sum each sample's input covariance: of the
    linear `modules` (name -> module), and of the `parameters` PEFT wraps (name within the
    layer -> (owning module, attribute)): a router's input, or per expert the tokens routed
    to it (every token with `all_experts`). Padding never counts (`lengths` of the samples).
    `experts`: the experts whose sums this pass keeps (all by default), when a layer's expert
    covariances outweigh the device and its forward runs once per such range (engine/sequential.py)."""

    def __init__(self, modules: dict[str, nn.Module], parameters: dict[str, tuple[nn.Module, str]] | None = None,
                 all_experts: bool = False, experts: range | None = None):
        self.sums: dict[str, torch.Tensor] = {}  # a module's key (the first of the modules sharing its input)
        self.key: dict[str, str] = {}
        self.samples = 0
        self.all_experts = all_experts
        self.experts = experts
        self.tokens: dict[str, torch.Tensor] = {}  # an expert stack's parameter -> tokens each expert saw
        self.reached: dict[str, torch.Tensor] = {}  # ... -> samples that routed a token to each expert
        self._inputs: dict[str, torch.Tensor] = {}
        self._handles = recording_inputs(modules, self._inputs)
        self._experts: dict[str, tuple[nn.Module, str]] = {}
        self._routed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(experts module) -> (tokens, top-k)
        for name, (owner, attr) in (parameters or {}).items():
            if is_routed_experts(owner) and getattr(owner, attr).dim() == 3:
                if attr not in ("gate_up_proj", "up_proj", "down_proj"):
                    raise ValueError(f"calibration: {name}: an expert parameter whose inputs are not known "
                                     "(gate_up_proj, up_proj and down_proj are)")
                if all(other is not owner for other, _ in self._experts.values()):  # one recorder per stack
                    self._handles.append(owner.register_forward_pre_hook(self._route_recorder(owner)))
                self._experts[name] = (owner, attr)
            elif getattr(owner, attr).dim() == 2:  # a router's weight: the module's input, flattened or not
                self._handles += recording_inputs({name: owner}, self._inputs)
            else:
                raise ValueError(f"calibration: {name} is a {getattr(owner, attr).dim()}-D parameter of "
                                 f"{type(owner).__name__}, whose inputs calibration cannot see")

    def _route_recorder(self, experts: nn.Module):
        def hook(module, args, kwargs=None):
            self._routed[id(experts)] = (args[0], args[1])
        return hook

    def add_batch(self, lengths: list[int]) -> None:
        """Fold the batch the layer just ran into the sums: a sample's rows beyond its length
        are padding."""
        width = max(lengths)
        owner = input_owners(self._inputs)
        for name, x in self._inputs.items():
            self.key.setdefault(name, owner[name])
            if owner[name] != name:  # q/k/v, gate/up: the same input tensor, one covariance
                continue
            if x.dim() == 2:  # tokens flattened (a router's input): rows are (sample, position)
                if x.shape[0] != len(lengths) * width:
                    raise ValueError(f"calibration: {name}'s input has {x.shape[0]} rows, the batch "
                                     f"{len(lengths)} x {width} tokens")
                x = x.view(len(lengths), width, -1)
            x = one_row_per_token(x)
            if x.dim() != 3 or x.shape[:2] != (len(lengths), width):
                raise ValueError(f"calibration: {name}'s input is {list(x.shape)}, not one row per token of the "
                                 f"batch ({len(lengths)} x {width})")
            total = self.sums.get(name)
            for row, length in enumerate(lengths):
                covariance = _sample_covariance(x[row, :length], f"{name} (sample {self.samples + row})")
                if total is None:
                    total = covariance
                else:  # in place: the same sums as PEFT's +=, without a second in x in tensor
                    total += covariance
                del covariance
            self.sums[name] = total
        for name, (experts, attr) in self._experts.items():
            self._add_experts(name, experts, attr, lengths, width)
        self.samples += len(lengths)
        self._inputs.clear()
        self._routed.clear()

    def _add_experts(self, name: str, experts: nn.Module, attr: str, lengths: list[int], width: int) -> None:
        """Per expert, per sample: the covariance of the inputs its `attr` matrix sees (the
        tokens routed to it, or their gated activation for down_proj)."""
        if id(experts) not in self._routed:
            raise ValueError(f"calibration: {name}: the layer's forward never called its experts")
        x, top_k = self._routed[id(experts)]
        if x.shape[0] != len(lengths) * width:
            raise ValueError(f"calibration: {name}: the experts got {x.shape[0]} tokens, the batch "
                             f"{len(lengths)} x {width}")
        x, top_k = x.view(len(lengths), width, -1), top_k.view(len(lengths), width, -1)
        count = experts.num_experts
        kept = self.experts if self.experts is not None else range(count)
        dim = getattr(experts, attr).shape[-1 if not experts.is_transposed else -2]
        total = self.sums.get(name)
        if total is None:  # row j: expert kept[j]
            total = torch.zeros(len(kept), dim, dim, dtype=torch.float32, device=x.device)
            self.tokens[name] = torch.zeros(count, dtype=torch.int64)
            self.reached[name] = torch.zeros(count, dtype=torch.int64)
        with torch.no_grad():
            for row, length in enumerate(lengths):
                for j, e in enumerate(kept):
                    picked = (top_k[row, :length] == e).any(dim=-1)
                    tokens = x[row, :length] if self.all_experts else x[row, :length][picked]
                    if tokens.shape[0] == 0:
                        continue
                    inputs = _expert_up(experts, tokens, e) if attr == "down_proj" else tokens
                    total[j] += _sample_covariance(inputs, f"{name}[{e}] (sample {self.samples + row})")
                    self.tokens[name][e] += tokens.shape[0]
                    self.reached[name][e] += 1
        self.sums[name] = total
        self.key[name] = name

    def covariances(self) -> dict[str, torch.Tensor]:
        """Each module's covariance, the mean over samples (shared between modules of one
        input); an expert stack's parameter: (the pass's) experts x in x in, each expert's the mean
        over the samples that reached it (as a hook on that expert alone would count its calls)."""
        def samples(key: str, total: torch.Tensor):
            if key not in self.reached:
                return self.samples
            reached = self.reached[key]
            if self.experts is not None:
                reached = reached[self.experts.start:self.experts.stop]
            return reached.clamp(min=1).to(total)[:, None, None]

        means = {key: total / samples(key, total) for key, total in self.sums.items()}
        return {name: means[key] for name, key in self.key.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

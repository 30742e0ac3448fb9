"""The model's own causal-LM loss on hidden states that leave its last decoder layer: the
model's forward runs with every decoder layer stood in for (calibration/layers.py), the last
one handing on the given hidden states, so the final norm, the head and transformers' loss
function are the model class's own code (its logit scaling and soft-capping included)."""

from __future__ import annotations

import torch
from torch import nn

from .layers import LayerStack
from .samples import CalibrationError, CalibrationSet


def check_causal_lm(config, where) -> None:
    """Refuse a model whose class computes no causal-LM loss (an encoder, a model with no
    head), naming it: the gradient needs one."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from ..planning.mapping import model_class_for

    cls = model_class_for(config)
    name = cls.__name__ if cls is not None else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if name not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        raise CalibrationError(f"{where}: {name or config.model_type} is not a causal language model with a head; "
                               "the gradient of the causal-LM loss needs one (LoRA-GA)")


def check_labels(calibration: CalibrationSet) -> None:
    """Every sample has a token to predict (two tokens at least), named if one has not."""
    short = [k for k, s in enumerate(calibration.samples) if int(s.numel()) < 2]
    if short:
        raise CalibrationError(f"calibration {calibration.source}: sample(s) {short[:10]} have fewer than 2 tokens, "
                               "so no token to predict (the causal-LM loss has no label there); drop them or give "
                               "longer text")


class HeadLoss:
    """The loss of one batch from the last decoder layer's output, and its gradient there."""

    def __init__(self, stack: LayerStack):
        self.stack = stack
        model = stack.model
        check_causal_lm(stack.config, stack.where / "config.json")
        head = model.get_output_embeddings()
        embedding = stack.base.get_input_embeddings()
        tied = getattr(stack.config, "tie_word_embeddings", False)
        name = next(n for n, m in model.named_modules() if m is head)
        for pname, p in list(head.named_parameters(recurse=False)):
            param = f"{name}.{pname}"
            if param not in stack.mapping.tensor_of and tied and pname == "weight":  # stored once, as the embeddings
                param = f"{stack.name_of(embedding)}.weight"
            setattr(head, pname, nn.Parameter(stack.read(param, p.shape, stack.dtype), requires_grad=False))

    def loss_and_gradient(self, last: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
                          ) -> tuple[float, torch.Tensor]:
        """(the batch's loss, d loss / d `last`): labels are the input ids with the padding
        ignored, the loss the model's own (the mean over the batch's predicted tokens), as
        `model(**batch, labels=...)` gives it."""
        stack = self.stack
        device = stack.device
        leaf = last.detach().to(device).requires_grad_(True)
        labels = input_ids.masked_fill(attention_mask == 0, -100).to(device)
        stack.state["stop_at"], stack.state["output_at"], stack.state["output"] = None, len(stack) - 1, leaf
        try:
            with torch.enable_grad():
                out = stack.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                  labels=labels, use_cache=False)
                out.loss.backward()
        finally:
            stack.state["output_at"], stack.state["output"] = None, None
        return out.loss.item(), leaf.grad

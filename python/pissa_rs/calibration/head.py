"""The model's own causal-LM loss on hidden states that leave its last decoder layer: the
model's forward runs with every decoder layer stood in for (calibration/layers.py), the last
one handing on the given hidden states, so the final norm, the head and transformers' loss
function are the model class's own code (its logit scaling and soft-capping included)."""

from __future__ import annotations

import torch
from torch import nn

from .layers import LayerStack
from .samples import CalibrationError, CalibrationSet

# The float32 logits one chunk of samples may take at the head (the loss holds a few times that)
LOGITS_BYTES = 256 << 20


def samples_per_chunk(length: int, vocab: int) -> int:
    """How many samples of `length` tokens the loss takes at a time: their float32 logits
    within LOGITS_BYTES, one sample at least."""
    return max(1, LOGITS_BYTES // max(1, 4 * length * vocab))


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
        ignored, the loss the model's own: the mean over the batch's predicted tokens, as
        `model(**batch, labels=...)` gives it. Computed a few samples at a time, each chunk's
        loss its tokens' sum divided by the whole batch's count (transformers' loss with
        num_items_in_batch), so the logits held are a chunk's, not the batch's (8 x 2048 tokens
        of a 128k vocabulary are 8.4 GB in float32, and the loss holds several such); each
        token's gradient is the same expression either way."""
        stack = self.stack
        device = stack.device
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        count = torch.tensor(int((labels[:, 1:] != -100).sum()), device=device)
        vocab = getattr(stack.config, "vocab_size", None) or stack.model.get_output_embeddings().weight.shape[0]
        rows = samples_per_chunk(input_ids.shape[1], vocab)
        total, grads = 0.0, []
        for start in range(0, input_ids.shape[0], rows):
            part = slice(start, start + rows)
            leaf = last[part].detach().to(device).requires_grad_(True)
            stack.state["stop_at"], stack.state["output_at"], stack.state["output"] = None, len(stack) - 1, leaf
            try:
                with torch.enable_grad():
                    out = stack.model(input_ids=input_ids[part].to(device), attention_mask=attention_mask[part].to(device),
                                      labels=labels[part].to(device), use_cache=False, num_items_in_batch=count)
                    out.loss.backward()
            finally:
                stack.state["output_at"], stack.state["output"] = None, None
            total += out.loss.item()
            grads.append(leaf.grad)
        return total, torch.cat(grads) if len(grads) > 1 else grads[0]

"""The logit change a LoRA makes against its exact reference (to-lora: the fine-tuned adapter on
the residual model; extract-lora: the fine-tuned model itself), on random token sequences:
one whole model in memory at a time, with transformers' and PEFT's own classes (opt-in: it is
a forward of the model, not out of core)."""

from __future__ import annotations

import os

import torch

from .noise import quiet_library_noise
from .precision import in_ieee_float32

ModelRef = tuple["str | os.PathLike[str]", "str | os.PathLike[str] | None"]  # (model, adapter on it or None)


def _logits(model_ref: ModelRef, ids: torch.Tensor | None, samples: int, length: int, seed: int):
    with quiet_library_noise():
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_ref[0]), dtype=torch.float32)
        if model_ref[1] is not None:
            model = PeftModel.from_pretrained(model, str(model_ref[1]))
    model.eval()
    if ids is None:  # the same sequences for both models, drawn from the first one's vocabulary and context
        vocab = model.get_input_embeddings().weight.shape[0]
        context = getattr(model.config, "max_position_embeddings", None) or length
        ids = torch.randint(0, vocab, (samples, min(length, context)), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits.double(), ids


@in_ieee_float32
def logit_change(reference: ModelRef, candidate: ModelRef, samples: int = 4, length: int = 64, seed: int = 0
                 ) -> dict:
    """KL(reference || candidate) per token (mean), top-1 agreement, and the largest and mean
    |logit difference| (beside the reference's mean |logit|), over `samples` random sequences."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"logit_check: the number of random sequences must be a positive integer, got {samples!r}")
    ref, ids = _logits(reference, None, samples, length, seed)
    cand, _ = _logits(candidate, ids, samples, length, seed)
    if ref.shape != cand.shape:
        raise ValueError(f"logit_check: the reference gives logits {list(ref.shape)}, the LoRA {list(cand.shape)}")
    log_ref, log_cand = torch.log_softmax(ref, -1), torch.log_softmax(cand, -1)
    return {
        "samples": samples, "length": ids.shape[1], "seed": seed,
        "kl": (log_ref.exp() * (log_ref - log_cand)).sum(-1).mean().item(),
        "top1_agreement": (ref.argmax(-1) == cand.argmax(-1)).double().mean().item(),
        "max_abs": (ref - cand).abs().max().item(),
        "mean_abs": (ref - cand).abs().mean().item(),
        "reference_mean_abs": ref.abs().mean().item(),
    }


def describe(change: dict) -> str:
    return (f"logits on {change['samples']} random sequences of {change['length']} tokens against the exact "
            f"reference: KL {change['kl']:.3g} per token, top-1 agreement {100 * change['top1_agreement']:.1f}%, "
            f"|difference| max {change['max_abs']:.3g}, mean {change['mean_abs']:.3g} (|logit| mean "
            f"{change['reference_mean_abs']:.3g})")

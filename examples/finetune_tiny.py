"""PiSSA end to end on a tiny Llama, on the CPU, in well under a minute:
decompose, load for training, a few real optimizer steps with transformers'
Trainer, save, convert to a LoRA of the original model, and check that
original model + converted LoRA == residual model + fine-tuned adapter.

    python examples/finetune_tiny.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from make_tiny_model import save_tiny_model
from peft import PeftModel
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import pissa_rs

TEXT = "PiSSA trains the principal singular values and vectors; the residual stays frozen. " * 30


def byte_dataset(block: int = 32) -> list[dict[str, torch.Tensor]]:
    """The tiny model's vocabulary is 256: bytes are its tokens."""
    ids = torch.tensor(list(TEXT.encode()), dtype=torch.long)
    return [{"input_ids": ids[i : i + block], "labels": ids[i : i + block]}
            for i in range(0, len(ids) - block, block)]


def run(workdir: Path) -> float:
    base = save_tiny_model(workdir / "base", "llama", layers=2)
    res = pissa_rs.decompose_checkpoint(base, r=8, out=workdir / "pissa", progress=False)

    model = pissa_rs.load_for_training(res.out)  # quantize="nf4" for QPiSSA-style 4-bit training
    args = TrainingArguments(output_dir=str(workdir / "trainer"), max_steps=12, per_device_train_batch_size=8,
                             learning_rate=3e-3, logging_steps=4, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=byte_dataset())
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    print(f"training loss: {' -> '.join(f'{x:.3f}' for x in losses)}")
    model.save_pretrained(workdir / "pissa_ft")

    converted = pissa_rs.convert_to_lora(res.adapter, workdir / "pissa_ft", workdir / "pissa_lora")
    print(f"converted to a LoRA of the original model, rank {max(converted.ranks.values())}: {converted.out}")

    tokens = byte_dataset()[0]["input_ids"][None]
    model.eval()
    with torch.no_grad():
        tuned = model(tokens).logits
        lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), converted.out)
        via_lora = lora(tokens).logits
    diff = (tuned - via_lora).abs().max().item()
    print(f"original + converted LoRA vs residual + fine-tuned adapter: max |logit difference| = {diff:.2e}")
    return diff


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, help="keep the files here (default: a temporary directory)")
    args = ap.parse_args()
    if args.workdir:
        diff = run(args.workdir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            diff = run(Path(tmp))
    return 0 if diff <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())

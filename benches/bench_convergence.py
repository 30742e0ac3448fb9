"""LoRA-GA's claim through pissa_rs's output: does its start lower the loss faster over the
first steps than LoRA's and PiSSA's, at the same rank and learning rate?

    python benches/bench_convergence.py [--pretrain 600] [--steps 60] [--rank 8] [--lr 1e-3]
        [--seeds 0,1,2] [--json OUT.json] [--smoke]

A tiny Llama (4 layers, hidden 128) is first trained from scratch on one text (the docstrings
of torch's public names) until it has learned something; then each start is fine-tuned with
PEFT on another (the docstrings of Python's standard library), the same batches in the same
order, AdamW at the same learning rate: LoRA (PEFT's default init: A random, B = 0), PiSSA and
LoRA-GA (pissa_rs's outputs; LoRA-GA calibrated on the task's first training batches). Printed: the
held-out loss (4 batches of the second text no run trains on) before the first step and after
a few step counts, and the mean training loss over the first steps, per start, averaged over
the seeds (the LoRA init's draw and the batches' order).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_calibrated import add_tokenizer  # noqa: E402
from bench_decompose import machine  # noqa: E402
from bench_forgetting import docs_of  # noqa: E402

STDLIB = ("os", "json", "re", "collections", "itertools", "functools", "pathlib", "subprocess", "shutil",
          "argparse", "logging", "datetime", "email", "http.client", "urllib.request", "threading", "asyncio",
          "csv", "sqlite3", "tarfile", "zipfile", "textwrap", "string", "decimal", "fractions", "statistics")


def token_batches(tokenizer, texts: list[str], length: int, batch: int) -> list[torch.Tensor]:
    """The texts as one stream of tokens cut into rows of `length`, `batch` rows a batch."""
    ids = [i for t in texts for i in tokenizer(t + "\n\n")["input_ids"]]
    rows = torch.tensor(ids[: len(ids) // length * length]).view(-1, length)
    return [rows[k:k + batch] for k in range(0, len(rows) - batch + 1, batch)]


def pretrain(path: Path, tokenizer, batches, steps: int, smoke: bool) -> float:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64 if smoke else 128,
                                      intermediate_size=176 if smoke else 344, num_hidden_layers=2 if smoke else 4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    losses = train(model, batches, steps, 3e-3, cosine=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return losses[-1]


def held_out_loss(model, held_out) -> float:
    model.eval()
    with torch.no_grad():
        loss = sum(model(input_ids=ids, labels=ids).loss.item() for ids in held_out) / len(held_out)
    model.train()
    return loss


def train(model, batches, steps: int, lr: float, cosine: bool = False, after=None) -> list[float]:
    """AdamW on the trainable parameters, one batch a step in order (cycling); the losses.
    `after(step)` runs after each step (1-based)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if cosine else None
    model.train()
    losses = []
    for step in range(steps):
        ids = batches[step % len(batches)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if after is not None:
            after(step + 1)
    return losses


def finetune(model, batches, held_out, steps: int, lr: float, marks: list[int]) -> dict:
    """Training losses, and the held-out loss before the first step and at each of `marks`."""
    curve = {0: held_out_loss(model, held_out)}
    losses = train(model, batches, steps, lr,
                   after=lambda step: curve.__setitem__(step, held_out_loss(model, held_out)) if step in marks else None)
    return {"train": losses, "held_out_curve": curve, "held_out": curve[steps]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain", type=int, default=600, help="steps of pretraining on the first text")
    ap.add_argument("--steps", type=int, default=60, help="fine-tuning steps on the second")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--calibration-batches", type=int, default=4, help="LoRA-GA's gradient: the task's first N batches")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--smoke", action="store_true", help="tiny and short: checks the script, not the claim")
    args = ap.parse_args()
    if args.smoke:
        args.pretrain, args.steps, args.seeds, args.calibration_batches = 20, 4, "0", 1
    import transformers
    from peft import LoraConfig, get_peft_model

    import pissa_rs

    t0 = time.perf_counter()
    import importlib

    first = docs_of(torch, torch.nn, torch.linalg)
    second = docs_of(*(importlib.import_module(name) for name in STDLIB))
    length, batch = (32, 4) if args.smoke else (128, 8)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        add_tokenizer(base, "\n\n".join(first + second), 512 if args.smoke else 2048)
        tokenizer = transformers.AutoTokenizer.from_pretrained(base)
        pretrain_batches = token_batches(tokenizer, first, length, batch)
        task = token_batches(tokenizer, second, length, batch)
        held_out, train = task[-4:], task[:-4]
        pretrained_loss = pretrain(base, tokenizer, pretrain_batches, args.pretrain, args.smoke)
        calibration = [tokenizer.decode(row) for b in train[: args.calibration_batches] for row in b]
        starts = {
            "pissa": pissa_rs.decompose_checkpoint(base, r=args.rank, out=Path(tmp) / "pissa", progress=False),
            "lora-ga": pissa_rs.decompose_checkpoint(base, r=args.rank, out=Path(tmp) / "lora-ga", method="lora-ga",
                                                     calibration=calibration, calibration_length=length,
                                                     calibration_batch=batch, progress=False),
        }
        results: dict[str, list[dict]] = {"lora": [], "pissa": [], "lora-ga": []}
        marks = sorted({s for s in (1, 5, 10, 20, 40, 60, 100) if s <= args.steps} | {args.steps})
        for seed in [int(s) for s in args.seeds.split(",")]:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
            shuffled = [train[k] for k in order]
            for name in results:
                torch.manual_seed(seed)
                if name == "lora":
                    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
                    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0,
                                                             target_modules="all-linear", task_type="CAUSAL_LM"))
                else:
                    model = pissa_rs.load_for_training(starts[name].out)
                results[name].append(finetune(model, shuffled, held_out, args.steps, args.lr, marks))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"pretrained to loss {pretrained_loss:.3f}; fine-tuning rank {args.rank}, lr {args.lr}, "
          f"{len(results['lora'])} seed(s); held-out loss after each step count (mean over the seeds)")
    print("| start | " + " | ".join(f"step {s}" for s in [0, *marks]) + f" | mean training loss, first "
          f"{min(20, args.steps)} steps |")
    print("|---|" + "---:|" * (len(marks) + 2))
    table = {}
    for name, runs in results.items():
        curve = {s: mean([r["held_out_curve"][s] for r in runs]) for s in [0, *marks]}
        first_steps = mean([mean(r["train"][:20]) for r in runs])
        table[name] = {"held_out_curve": curve, "mean_first_20": first_steps, "held_out": curve[args.steps]}
        print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in curve.values()) + f" | {first_steps:.3f} |")
    print(f"machine: {machine()}; {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"pretrained_loss": pretrained_loss, "table": table, "runs": results,
                                         "args": vars(args) | {"json": str(args.json)}}, indent=1))


if __name__ == "__main__":
    main()

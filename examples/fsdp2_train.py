"""A pissa_rs output trained sharded with FSDP2 (torch's `fully_shard`), one process per rank:

    torchrun --standalone --nproc_per_node 2 examples/fsdp2_train.py OUT RUN [--steps 6] [--quantize nf4] [--backend gloo]

The residual stays frozen and the float32 adapter trains (AdamW). Each decoder layer (the
classes transformers' `_no_split_modules` names), then the whole model, is sharded. The global
batch (8 sequences) is split across the ranks, so a 2-process run takes the steps a 1-process
run takes, within float rounding. Rank 0 prints the loss of each step (`step N loss L`, the
mean over the global batch) and saves the trained adapter, gathered whole, as PEFT saves one,
into RUN/adapter (AutoPeftModelForCausalLM opens it onto OUT; to-lora converts it).
On a GPU node: `--backend nccl`, and each rank takes `cuda:LOCAL_RANK`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

import pissa_rs

TEXT = ("PiSSA trains the principal singular values and vectors of each weight; the residual stays frozen, "
        "and a sharded run takes the steps one process takes. ") * 12


def batches(vocab: int, steps: int, size: int = 8, block: int = 24) -> list[torch.Tensor]:
    """The same global batches whatever the number of ranks: bytes of TEXT as token ids."""
    ids = torch.tensor(list(TEXT.encode()), dtype=torch.long) % vocab
    rows = [ids[i: i + block] for i in range(0, len(ids) - block, block)]
    return [torch.stack([rows[(s * size + k) % len(rows)] for k in range(size)]) for s in range(steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="a pissa_rs output (its residual and pissa_init)")
    parser.add_argument("run", type=Path, help="where the trained adapter goes (RUN/adapter)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--quantize", default=None, help="load the residual quantized (QPiSSA): nf4, fp4, int8")
    args = parser.parse_args()

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}") if args.backend == "nccl" else torch.device("cpu")
    torch.manual_seed(0)
    model = pissa_rs.load_for_training(args.out, quantize=args.quantize, compute_dtype=torch.float32).to(device)
    base = model.get_base_model()
    blocks = set(base._no_split_modules or ())  # the decoder layer class(es), as transformers names them
    layers = [m for m in base.modules() if type(m).__name__ in blocks]
    if not layers:
        raise SystemExit(f"{type(base).__name__} names no decoder layer class (_no_split_modules) to shard by")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    if rank == 0:  # what a run that only looks sharded (DDP in disguise) would not say
        print(f"sharded {sum(isinstance(p, DTensor) for p in params)} of {len(params)} parameters over {world} "
              "rank(s)", flush=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    global_batches = batches(model.get_base_model().config.vocab_size, args.steps)
    if global_batches[0].shape[0] % world:
        raise SystemExit(f"the global batch ({global_batches[0].shape[0]}) does not split over {world} ranks")
    for step, batch in enumerate(global_batches):
        mine = batch.chunk(world)[rank].to(device)
        loss = model(input_ids=mine, labels=mine).loss  # every row has as many tokens: the mean of rank means
        loss.backward()  # FSDP averages the gradients over the ranks
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0:
            print(f"step {step} loss {mean.item() / world:.9f}", flush=True)
    # every rank takes part in the gather; rank 0 writes
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        from peft import get_peft_model_state_dict

        whole = pissa_rs.load_for_training(args.out, compute_dtype=torch.float32)
        adapter = {k: v for k, v in full.items() if "lora_" in k}
        missing = whole.load_state_dict(adapter, strict=False).unexpected_keys
        if missing:
            raise SystemExit(f"adapter tensors the unsharded model does not have: {missing[:4]}")
        whole.save_pretrained(args.run / "adapter")
        print(f"saved {len(get_peft_model_state_dict(whole))} adapter tensors to {args.run / 'adapter'}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Benchmark: adapters at the rank a server takes (#34), on TinyLlama-1.1B shapes.

    python benches/bench_serving.py [--layers 22] [--rank 128] [--workdir DIR] [--json OUT.json] [--smoke]

Builds bench_decompose.py's synthetic checkpoint (BASE) and two synthetic fine-tunings of it:

- a PiSSA fine-tuning: BASE decomposed at r (not timed), its adapter moved at random, so
  that each module's update dW = B'A' - B0A0 has rank 2r. Then, each in its own process:
  `to_lora`: pissa_rs.convert_to_lora(init, tuned, rank=r), from the factors alone, against
  `peft_to_lora`: PEFT's save_as_lora(rank=r) of the exact rank-2r LoRA on the original
  model loaded whole (the exact LoRA made beforehand by pissa_rs, not timed: PEFT's own way
  to it loads the residual model too).
- a full fine-tuning: every projection of BASE plus a random rank-2r change (FINETUNED).
  `extract`: pissa_rs.extract_lora(BASE, FINETUNED, r) (randomized SVD, niter 4), against
  `extract_exact`: the same with niter=0 (a full SVD, as mergekit), and
  `mergekit`: mergekit-extract-lora --max-rank r (a full SVD of each difference).

Wall time (after the imports each runner names; pissa_rs imports transformers and PEFT
inside, for planning), the whole process's time, and peak RSS (VmHWM) per process; for the two extractions, each
module's rank-r error ||D - s B A|| / ||D|| from the files, averaged (the "equal error"
condition), and for the conversions each module's error against the exact update.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_decompose import PROJECTIONS, machine, make_checkpoint, run_script  # noqa: E402

HARNESS = """
import json, os, sys, time
{imports}
ARGS = json.loads(sys.argv[1])
_t = time.perf_counter()
{body}
wall = time.perf_counter() - _t
status = open("/proc/self/status").read()
peak = next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmHWM:")) * 1024
print(json.dumps({{"wall_s": wall, "peak_rss_bytes": peak}}))
"""

RUNNERS = {
    "to_lora": ("import torch, pissa_rs", """
pissa_rs.convert_to_lora(ARGS["init"], ARGS["tuned"], ARGS["out"], rank=ARGS["rank"])
"""),
    "peft_to_lora": ("import torch, peft, transformers", """
from peft import PeftModel
from peft.tuners.lora.conversion import save_as_lora
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(ARGS["src"], dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, ARGS["exact"])
save_as_lora(ARGS["out"], model, rank=ARGS["rank"])
"""),
    "extract": ("import torch, pissa_rs", """
pissa_rs.extract_lora(ARGS["src"], ARGS["finetuned"], ARGS["out"], r=ARGS["rank"], progress=False,
                      target_modules=ARGS["targets"])
"""),
    "extract_exact": ("import torch, pissa_rs", """
pissa_rs.extract_lora(ARGS["src"], ARGS["finetuned"], ARGS["out"], r=ARGS["rank"], progress=False, niter=0,
                      target_modules=ARGS["targets"])
"""),
    "mergekit": ("import torch, mergekit.scripts.extract_lora as mk", """
mk.main(["--model", ARGS["finetuned"], "--base-model", ARGS["src"], "--out-path", ARGS["out"],
         "--max-rank", str(ARGS["rank"]), "--skip-undecomposable", "--no-embed-lora",
         *[x for t in ARGS["excluded"] for x in ("-e", t)]], standalone_mode=False)
"""),
}


def run(name: str, args: dict) -> dict:
    imports, body = RUNNERS[name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return run_script(name, HARNESS.format(imports=imports, body=body), [json.dumps(args)], env)


def shard_tensors(folder: Path) -> dict:
    import safetensors.torch

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in safetensors.torch.load_file(f).items()}


def fully_finetuned(src: Path, dst: Path, rank: int) -> None:
    """BASE's files with each projection plus a random rank-`rank` change (bf16, as stored)."""
    import shutil

    import safetensors.torch
    import torch

    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(1)
    for f in sorted(dst.glob("*.safetensors")):
        tensors = safetensors.torch.load_file(f)
        for name, w in tensors.items():
            if any(f".{p}." in name for p in PROJECTIONS):
                change = torch.randn(w.shape[0], rank, generator=g) @ torch.randn(rank, w.shape[1], generator=g)
                tensors[name] = (w.float() + 0.002 * change / rank ** 0.5).to(w.dtype)
        safetensors.torch.save_file(tensors, f, metadata={"format": "pt"})


def pissa_tuned(src: Path, root: Path, rank: int) -> tuple[Path, Path, Path]:
    """BASE decomposed at `rank`, its adapter moved at random (a rank-2r update), and the exact LoRA."""
    import shutil

    import safetensors.torch
    import torch

    import pissa_rs

    res = pissa_rs.decompose_checkpoint(src, r=rank, target_modules=PROJECTIONS, out=root / "pissa", progress=False)
    tuned = root / "tuned"
    shutil.copytree(res.adapter, tuned)
    weights = safetensors.torch.load_file(tuned / "adapter_model.safetensors")
    g = torch.Generator().manual_seed(2)
    for k, w in weights.items():
        weights[k] = w + 0.05 * w.std() * torch.randn(w.shape, generator=g)
    safetensors.torch.save_file(weights, tuned / "adapter_model.safetensors", metadata={"format": "pt"})
    pissa_rs.convert_to_lora(res.adapter, tuned, root / "exact")
    return res.adapter, tuned, root / "exact"


def lora_errors(adapter: Path, base: dict, finetuned: dict | None = None, exact: dict | None = None) -> float:
    """Mean over modules of ||D - s B A||_F / ||D||_F; D = W_ft - W_base, or the exact LoRA's s B A."""
    import torch

    config = json.loads((adapter / "adapter_config.json").read_text())
    weights = shard_tensors(adapter)
    errors = []
    for key in weights:
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        pattern = lambda field, default: next(  # noqa: E731
            (v for p, v in (config.get(field) or {}).items() if module.endswith(p.replace("\\", ""))), default)
        scale = pattern("alpha_pattern", config["lora_alpha"]) / pattern("rank_pattern", config["r"])
        delta = scale * weights[key.replace(".lora_A.", ".lora_B.")].double() @ weights[key].double()
        if exact is not None:
            target = exact[module]
        else:
            name = f"{module}.weight"
            target = finetuned[name].double() - base[name].double()
        errors.append((torch.linalg.matrix_norm(target - delta) / torch.linalg.matrix_norm(target)).item())
    return sum(errors) / len(errors)


def exact_updates(folder: Path) -> dict:
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = shard_tensors(folder)
    scale = config["lora_alpha"] / config["r"]
    return {k.removeprefix("base_model.model.").split(".lora_A.")[0]:
            scale * weights[k.replace(".lora_A.", ".lora_B.")].double() @ w.double()
            for k, w in weights.items() if ".lora_A." in k}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--methods", default="to_lora,peft_to_lora,extract,extract_exact,mergekit")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script, not the speed")
    args = ap.parse_args()
    dims = dict(hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000, layers=args.layers)
    rank, shard_bytes = args.rank, 1 << 30
    if args.smoke:
        dims, rank, shard_bytes = dict(hidden=128, intermediate=352, heads=4, kv_heads=2, vocab=512, layers=2), 8, 200_000
    methods = args.methods.split(",")
    results = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        src = root / "base"
        t0 = time.perf_counter()
        make_checkpoint(src, dims, shard_bytes)
        config = json.loads((src / "config.json").read_text())  # mergekit picks its architecture by this name
        (src / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}, indent=2))
        base = shard_tensors(src)
        if {"to_lora", "peft_to_lora"} & set(methods):
            init, tuned, exact = pissa_tuned(src, root, rank)
            exact_delta = exact_updates(exact)
        if {"extract", "extract_exact", "mergekit"} & set(methods):
            fully_finetuned(src, root / "finetuned", 2 * rank)
            finetuned = shard_tensors(root / "finetuned")
        print(f"setup: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for method in methods:
            out = root / f"out-{method}"
            common = {"src": str(src.resolve()), "out": str(out.resolve()), "rank": rank}
            if method in ("to_lora", "peft_to_lora"):
                result = run(method, {**common, "init": str(init), "tuned": str(tuned), "exact": str(exact)})
                result["error"] = lora_errors(out, base, exact=exact_delta)
            else:
                result = run(method, {**common, "finetuned": str((root / "finetuned").resolve()),
                                      "targets": PROJECTIONS, "excluded": ["embed_tokens", "lm_head", "norm"]})
                result["error"] = lora_errors(out, base, finetuned)  # every LoRA lands in OUT itself
            print(method, result, file=sys.stderr)
            results[method] = result
    print("| method | wall (s) | process, imports included (s) | peak RSS (GiB) | mean rank-r error |\n"
          "|---|---:|---:|---:|---:|")
    for method, r in results.items():
        print(f"| {method} | {r['wall_s']:.1f} | {r['process_s']:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} | "
              f"{r['error']:.4f} |")
    for ours, theirs in (("to_lora", "peft_to_lora"), ("extract", "mergekit"), ("extract_exact", "mergekit")):
        if {ours, theirs} <= results.keys():
            print(f"{ours} / {theirs}: wall {results[ours]['wall_s'] / results[theirs]['wall_s']:.2f}x, peak RSS "
                  f"{results[ours]['peak_rss_bytes'] / results[theirs]['peak_rss_bytes']:.2f}x")
    print(f"machine: {machine()}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "dims": dims, "rank": rank, "results": results},
                                        indent=1))


if __name__ == "__main__":
    main()

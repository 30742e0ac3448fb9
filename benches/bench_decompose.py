"""Benchmark: pissa_rs vs PEFT's in-memory way vs the compute floor, on TinyLlama-1.1B shapes.

    python benches/bench_decompose.py [--workdir DIR] [--layers 22] [--shapes tinyllama|llama3-8b]
                                      [--smoke] [--json OUT.json]

Builds a synthetic checkpoint with TinyLlama-1.1B shapes (hidden 2048, intermediate
5632, 22 layers, 32 heads, 4 kv heads, vocab 32000, bf16, 1 GiB shards), then runs,
each in its own process so that peak RSS (VmHWM, file-backed pages included) is its own:

- pissa_rs:  decompose_checkpoint(r=128, niter=4, all 7 projections)
- peft:      from_pretrained, get_peft_model(init_lora_weights="pissa_niter_4"),
             save the adapter, unload, save the residual
- pissa_rs_warm: the same in a process that imported transformers and PEFT beforehand,
             as the peft method's does (the planner forks from it: no imports to pay)
- baseline:  pissa_rs as another version of it runs it (--baseline DIR: that version's
             python/ folder, built), in the same run, to compare versions
- floor:     the same torch work (pissa_rs.principal_factors) on tensors already in
             memory, no I/O; loading them is not timed
- nf4:       pissa_rs for QPiSSA training in nf4 (quantize="nf4", no error measurement):
             the bf16 residual, which training quantizes at every load
- nf4_saved: the same with save_quantized=True: the residual written in nf4
             (--methods pissa_rs,nf4,nf4_saved compares bytes written and wall time)
- milora, mica, olora: pissa_rs with that --method; peft_mica, peft_olora: PEFT's own init
             of the same method, the whole model in memory (MiLoRA is not in PEFT)

--sources bf16,ct-int4,gptq,awq runs the methods on the checkpoint re-stored as each INT4
format (round to nearest, groups of 128; compressed-tensors pack-quantized, GPTQ v1, AWQ
GEMM): "pissa_rs@gptq" against "pissa_rs" is what reading and dequantizing that format costs.

--shapes llama3-8b uses Llama-3-8B's shapes instead (hidden 4096, intermediate 14336,
32 heads, 8 kv heads, vocab 128256): with --layers 1 and 4, peak RSS per weight size;
--shapes llama3-70b (hidden 8192, intermediate 28672, 64 heads, 8 kv heads) the same at 70B's.

--smoke runs the same at a tiny scale (CI uses it to keep the script working; its
timings mean nothing).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def shapes(hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int, layers: int) -> dict[str, list[int]]:
    """LlamaForCausalLM's tensor names and shapes."""
    kv = hidden // heads * kv_heads
    out = {"model.embed_tokens.weight": [vocab, hidden]}
    for i in range(layers):
        p = f"model.layers.{i}"
        out |= {
            f"{p}.self_attn.q_proj.weight": [hidden, hidden],
            f"{p}.self_attn.k_proj.weight": [kv, hidden],
            f"{p}.self_attn.v_proj.weight": [kv, hidden],
            f"{p}.self_attn.o_proj.weight": [hidden, hidden],
            f"{p}.mlp.gate_proj.weight": [intermediate, hidden],
            f"{p}.mlp.up_proj.weight": [intermediate, hidden],
            f"{p}.mlp.down_proj.weight": [hidden, intermediate],
            f"{p}.input_layernorm.weight": [hidden],
            f"{p}.post_attention_layernorm.weight": [hidden],
        }
    out |= {"model.norm.weight": [hidden], "lm_head.weight": [vocab, hidden]}
    return out


def make_checkpoint(path: Path, dims: dict, shard_bytes: int) -> int:
    """Write a random bf16 Llama checkpoint with HF shard naming and index; returns its bytes."""
    from transformers import LlamaConfig

    path.mkdir(parents=True, exist_ok=True)
    LlamaConfig(
        hidden_size=dims["hidden"], intermediate_size=dims["intermediate"], num_hidden_layers=dims["layers"],
        num_attention_heads=dims["heads"], num_key_value_heads=dims["kv_heads"], vocab_size=dims["vocab"],
        tie_word_embeddings=False, dtype="bfloat16",
    ).save_pretrained(path)
    return write_random_shards(path, shapes(**dims), shard_bytes)


def write_random_shards(path: Path, tensors: dict[str, list[int]], shard_bytes: int) -> int:
    """Random bf16 tensors (std 0.02) in shards of about shard_bytes, named and indexed as
    save_pretrained does; returns their bytes."""
    import torch

    import pissa_rs

    shards, current, size = [], [], 0
    for name, shape in tensors.items():
        n = 2 * int(torch.Size(shape).numel())
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    shards.append(current)
    weight_map, total = {}, 0
    g = torch.Generator().manual_seed(0)
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = pissa_rs.ShardWriter(path / file, [(n, "BF16", tensors[n]) for n in names], {"format": "pt"})
        for n in names:
            t = (torch.randn(tensors[n], generator=g) * 0.02).to(torch.bfloat16)
            writer.write(n, pissa_rs.as_numpy_bytes(t))
            weight_map[n] = file
            total += t.numel() * 2
        writer.finalize()
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


# --sources: the same checkpoint re-stored as the INT formats people download, round to
# nearest per group of 128 (what is measured is reading them, not how well they quantize)
GROUP = 128  # (--smoke: 32, which divides its shapes)
QUANTIZATION_CONFIGS = {
    "ct-int4": {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized", "weights": {
                    "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP}}},
                "ignore": ["lm_head"]},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": True,
             "checkpoint_format": "gptq"},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"},
}


def _pack_rows(codes, dim: int):
    """4-bit codes (0..15) packed 8 to an int32 word along `dim`, code k at bits [4k, 4k+4)."""
    import torch

    c = codes.movedim(dim, -1).to(torch.int64)
    c = c.reshape(*c.shape[:-1], -1, 8)
    words = (c << (torch.arange(8) * 4)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def int4_tensors(name: str, w, source: str, group: int) -> dict:
    """One bf16 projection weight [R, C] as `source` stores it (symmetric / zero point 8)."""
    import torch

    rows, cols = w.shape
    groups = w.float().reshape(rows, cols // group, group)
    scale = (groups.abs().amax(-1) / 7.5).clamp(min=1e-8)  # [R, G]
    prefix = name.removesuffix(".weight")
    if source == "ct-int4":
        scale = scale.to(torch.bfloat16)
        q = torch.clamp(torch.round(groups / scale.float()[..., None]), -8, 7).reshape(rows, cols) + 8
        return {f"{prefix}.weight_packed": _pack_rows(q, 1), f"{prefix}.weight_scale": scale,
                f"{prefix}.weight_shape": torch.tensor([rows, cols])}
    scale = scale.to(torch.float16)
    q = torch.clamp(torch.round(groups / scale.float()[..., None]) + 8, 0, 15).reshape(rows, cols)
    zeros = torch.full((cols // group, rows), 8, dtype=torch.int64)
    if source == "gptq":  # v1: zero points stored minus one
        return {f"{prefix}.qweight": _pack_rows(q.T, 0), f"{prefix}.qzeros": _pack_rows(zeros - 1, 1),
                f"{prefix}.scales": scale.T.contiguous(), f"{prefix}.g_idx": (torch.arange(cols) // group).int()}
    order = torch.arange(rows).view(-1, 8)[:, [0, 2, 4, 6, 1, 3, 5, 7]].reshape(-1)  # AWQ's interleave
    return {f"{prefix}.qweight": _pack_rows(q.T[:, order], 1), f"{prefix}.qzeros": _pack_rows(zeros[:, order], 1),
            f"{prefix}.scales": scale.T.contiguous()}


def quantize_checkpoint(src: Path, dst: Path, source: str, group: int = GROUP) -> int:
    """`src` (bf16) with its decoder projections stored as `source` in groups of `group`;
    returns the bytes."""
    import shutil

    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for shard in sorted(src.glob("*.safetensors")):
        out = {}
        for name, value in load_file(shard).items():
            if any(name.endswith(f".{p}.weight") for p in PROJECTIONS):
                out.update(int4_tensors(name, value, source, group))
            else:
                out[name] = value
        save_file(out, dst / shard.name, metadata={"format": "pt"})
        weight_map |= {n: shard.name for n in out}
        total += (dst / shard.name).stat().st_size
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = json.loads(json.dumps(QUANTIZATION_CONFIGS[source]).replace(
        f'"group_size": {GROUP}', f'"group_size": {group}'))
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for extra in src.glob("generation_config.json"):
        shutil.copy(extra, dst)
    return total


# Each method: (imports, done before the clock starts; the timed work).
RUNNERS = {
    "pissa_rs": ("import torch, pissa_rs", """
pissa_rs.decompose_checkpoint(SRC, r=R, niter=NITER, target_modules=TARGETS, out=OUT, progress=False)
"""),
    "peft": ("import os, torch, peft, transformers", """
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.bfloat16)
config = LoraConfig(r=R, lora_alpha=R, lora_dropout=0.0, target_modules=TARGETS,
                    init_lora_weights=f"pissa_niter_{NITER}", task_type="CAUSAL_LM")
model = get_peft_model(model, config)
model.peft_config["default"].init_lora_weights = True
model.save_pretrained(os.path.join(OUT, "pissa_init"))
model = model.unload()
model.save_pretrained(OUT)
"""),
    "nf4": ("import torch, pissa_rs", """
pissa_rs.decompose_checkpoint(SRC, r=R, niter=NITER, target_modules=TARGETS, out=OUT, progress=False,
                              quantize="nf4", measure_error=False)
"""),
    "nf4_saved": ("import torch, pissa_rs", """
pissa_rs.decompose_checkpoint(SRC, r=R, niter=NITER, target_modules=TARGETS, out=OUT, progress=False,
                              quantize="nf4", measure_error=False, save_quantized=True)
"""),
    "floor": ("import torch, pissa_rs", """
from pissa_rs.factors import principal_factors, scaling, tensor_seed
ck = pissa_rs.Checkpoint(SRC)
names = [n for n in ck.names() if any(f".{t}." in n for t in TARGETS)]
weights = {n: pissa_rs.as_torch(ck.buffer(n)).clone() for n in names}  # in memory, not timed
del ck
START()
for n, w in weights.items():
    principal_factors(w, R, scaling(R, R), niter=NITER, seed=tensor_seed(0, n))
"""),
}

# The other methods (--methods mica,peft_mica,olora,peft_olora,milora): ours, and PEFT's own init of the
# same method with the whole model in memory (MiLoRA is not in PEFT: compare it with pissa_rs)
for _method in ("milora", "mica", "olora"):
    RUNNERS[_method] = ("import torch, pissa_rs", f"""
pissa_rs.decompose_checkpoint(SRC, r=R, target_modules=TARGETS, out=OUT, progress=False, method="{_method}")
""")
RUNNERS["peft_mica"] = ("import os, torch, peft, transformers", """
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.bfloat16)
config = LoraConfig(r=R, lora_alpha=R, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights="mica",
                    task_type="CAUSAL_LM")
model = get_peft_model(model, config)
model.save_pretrained(os.path.join(OUT, "pissa_init"))  # the base is unchanged: the adapter alone
""")
RUNNERS["peft_olora"] = ("import os, torch, peft, transformers", """
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.bfloat16)
config = LoraConfig(r=R, lora_alpha=R, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights="olora",
                    task_type="CAUSAL_LM")
model = get_peft_model(model, config)
model.peft_config["default"].init_lora_weights = True
model.save_pretrained(os.path.join(OUT, "pissa_init"))
model = model.unload()
model.save_pretrained(OUT)
""")

# The same run, in a process that imported transformers and PEFT first, and as another version runs it
RUNNERS["pissa_rs_warm"] = ("import torch, pissa_rs, transformers, peft", RUNNERS["pissa_rs"][1])
RUNNERS["baseline"] = RUNNERS["pissa_rs"]

HARNESS = """
import json, sys, time
{imports}
SRC, OUT, R, NITER = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
TARGETS = json.loads(sys.argv[5])
_t = [time.perf_counter()]
def START():
    _t[0] = time.perf_counter()
{body}
wall = time.perf_counter() - _t[0]
status = open("/proc/self/status").read()
peak = next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmHWM:")) * 1024
print(json.dumps({{"wall_s": wall, "peak_rss_bytes": peak}}))
"""


def run_script(name: str, code: str, args: list[str], env: dict | None = None) -> dict:
    """Run `code` in its own Python process; its last stdout line is a JSON result.
    Adds process_s, the whole process's wall time (imports included)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started
    return result


def run_method(name: str, src: Path, out: Path, r: int, niter: int, baseline: Path | None = None,
               profile: bool = False) -> dict:
    """wall_s is timed inside the process after its imports. `profile`: pissa_rs's runs
    record their timeline (PISSA_RS_PROFILE), summarized under "timeline"."""
    import os

    imports, body = RUNNERS[name]
    env = None
    if name == "baseline":
        if baseline is None:
            raise SystemExit("--methods baseline needs --baseline DIR (another version's python/ folder)")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(baseline), os.environ.get("PYTHONPATH", "")])}
    timeline = out.parent / f"timeline-{name}.jsonl"
    if profile and name.startswith("pissa_rs"):
        timeline.unlink(missing_ok=True)
        env = {**(env or os.environ), "PISSA_RS_PROFILE": str(timeline)}
    result = run_script(name, HARNESS.format(imports=imports, body=body),
                        [str(src), str(out), str(r), str(niter), json.dumps(PROJECTIONS)], env)
    if profile and timeline.is_file():
        from pissa_rs.engine.timeline import summary

        result["timeline"] = summary(timeline)
    result["bytes_written"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir() else 0
    return result


def machine() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, help="where to build the checkpoint (default: a temporary directory)")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--niter", type=int, default=4)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script, not the speed")
    ap.add_argument("--shapes", choices=["tinyllama", "llama3-8b", "llama3-70b"], default="tinyllama")
    ap.add_argument("--methods", default="pissa_rs,peft,floor")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--sources", default="bf16", help="comma-separated: bf16, ct-int4 (compressed-tensors "
                    "pack-quantized), gptq, awq; each method runs on the checkpoint stored that way")
    ap.add_argument("--baseline", type=Path, help="for --methods ...,baseline: another pissa_rs version's python/ "
                    "folder (with its compiled module), e.g. from `git worktree add`")
    ap.add_argument("--profile", action="store_true", help="pissa_rs's runs record their timeline: seconds computing, "
                    "reading, waiting for input and for the writer")
    ap.add_argument("--repeat", type=int, default=1, help="run the methods this many times, interleaved; the table "
                    "gives each method's fastest")
    args = ap.parse_args()

    if args.smoke:
        dims = dict(hidden=128, intermediate=352, heads=4, kv_heads=2, vocab=512, layers=2)
        rank, shard_bytes = 8, 200_000
    else:
        dims = dict(hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000, layers=args.layers)
        if args.shapes == "llama3-8b":
            dims = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256, layers=args.layers)
        elif args.shapes == "llama3-70b":
            dims = dict(hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=128256, layers=args.layers)
        rank, shard_bytes = args.rank, 1 << 30

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src = Path(tmp) / "tinyllama-shapes"
        t0 = time.perf_counter()
        total = make_checkpoint(src, dims, shard_bytes)
        print(f"checkpoint: {total / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        sources = {"bf16": (src, total)}
        for source in args.sources.split(","):
            if source != "bf16":
                t0 = time.perf_counter()
                stored = quantize_checkpoint(src, Path(tmp) / source, source, 32 if args.smoke else GROUP)
                sources[source] = (Path(tmp) / source, stored)
                print(f"{source}: {stored / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        results = {}
        for _ in range(args.repeat):
            for source in args.sources.split(","):
                for method in args.methods.split(","):
                    key = method if source == "bf16" else f"{method}@{source}"
                    out = Path(tmp) / f"out-{key}"
                    if out.exists():
                        import shutil

                        shutil.rmtree(out)
                    run = run_method(method, sources[source][0], out, rank, args.niter, args.baseline, args.profile)
                    run["bytes_read"] = sources[source][1]
                    print(key, run, file=sys.stderr)
                    if key not in results or run["wall_s"] < results[key]["wall_s"]:
                        results[key] = run

    report = {"machine": machine(), "dims": dims, "rank": rank, "niter": args.niter, "bytes": total,
              "results": results}
    print("| method | wall (s) | peak RSS (GiB) | read (GiB) | written (GiB) |\n|---|---:|---:|---:|---:|")
    for method, r in results.items():
        print(f"| {method} | {r['wall_s']:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} | {r['bytes_read'] / 2**30:.2f} | "
              f"{r['bytes_written'] / 2**30:.2f} |")
    for method, r in results.items():
        if "timeline" in r:
            t = r["timeline"]
            print(f"{method} timeline: {t['weights']} weights over {t['wall_s']:.1f} s; "
                  + ", ".join(f"{kind} {seconds:.1f} s" for kind, seconds in t["seconds"].items())
                  + f"; devices computing {100 * t['device_compute_share']:.0f}% of their time")
    if "pissa_rs" in results:
        ours = results["pissa_rs"]["wall_s"]
        for other in ("peft", "floor", "baseline"):
            if other in results:
                print(f"pissa_rs / {other} wall: {ours / results[other]['wall_s']:.2f}x")
                if "pissa_rs_warm" in results:
                    warm = results["pissa_rs_warm"]["wall_s"]
                    print(f"pissa_rs_warm / {other} wall: {warm / results[other]['wall_s']:.2f}x")
    for method in ("mica", "olora"):
        if {method, f"peft_{method}"} <= results.keys():
            ours, theirs = results[method], results[f"peft_{method}"]
            print(f"{method} / peft_{method}: wall {ours['wall_s'] / theirs['wall_s']:.2f}x, peak RSS "
                  f"{ours['peak_rss_bytes'] / theirs['peak_rss_bytes']:.2f}x")
    if {"nf4", "nf4_saved"} <= results.keys():
        dense, saved = results["nf4"], results["nf4_saved"]
        print(f"save_quantized: {saved['bytes_written'] / dense['bytes_written']:.2f}x the bytes, "
              f"{saved['wall_s'] / dense['wall_s']:.2f}x the wall time of the bf16 residual")
    print(f"machine: {report['machine']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

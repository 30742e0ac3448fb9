"""The fixed runs whose output bytes are pinned in tests/data/same_bytes.json.

    python tests/same_bytes.py WORKDIR            prints every output file's SHA-256 as JSON
    python tests/same_bytes.py WORKDIR --record   writes them into tests/data/same_bytes.json

Run it only through `run_pinned` (tests/test_same_bytes.py does): the environment it sets
makes torch, MKL and oneDNN take their baseline code paths on one thread, so the bytes do
not depend on the CPU's vector extensions (AVX2 / AVX-512) or its core count. Paths are
replaced by ROOT and timings dropped before hashing the JSON files, which name both.

The runs cover what the engine writes: dense sharded, several ranks, QPiSSA (T=2,
save_quantized), MoE with experts fused on disk (GPT-OSS) and per expert (Mixtral), an FP8
source (bf16 residual and keep_source_format), and two CPU devices.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
FIXTURE = HERE / "data" / "same_bytes.json"

# Baseline kernels, one thread: the same bytes on any x86-64 CPU.
PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "CUDA_VISIBLE_DEVICES": "",
}
VOLATILE = ("seconds", "input", "out", "run", "quantizer", "base_model")


def _normalized_json(path: Path, root: Path) -> bytes:
    data = json.loads(path.read_text().replace(str(root), "ROOT"))

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not any(k.endswith(s) for s in VOLATILE)}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return json.dumps(strip(data), sort_keys=True).encode()


def digests(out: Path, root: Path) -> dict[str, str]:
    found = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            data = _normalized_json(p, root) if p.suffix == ".json" else p.read_bytes()
            found[p.relative_to(out).as_posix()] = hashlib.sha256(data).hexdigest()
    return found


def runs(root: Path) -> dict[str, dict[str, str]]:
    import torch
    import transformers
    from helpers import save_spread, text
    from low_precision import save_fp8_block

    import pissa_rs

    def llama(path):
        torch.manual_seed(0)
        save_spread(transformers.LlamaForCausalLM(transformers.LlamaConfig(**text())), path,
                    max_shard_size="100KB")

    def moe(path, cls, config):
        torch.manual_seed(0)
        save_spread(cls(config), path, max_shard_size="100KB")

    llama(root / "llama")
    moe(root / "gpt-oss", transformers.GptOssForCausalLM, transformers.GptOssConfig(**text(
        num_local_experts=4, num_experts_per_tok=2, head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})))
    moe(root / "mixtral", transformers.MixtralForCausalLM,
        transformers.MixtralConfig(**text(num_local_experts=4, num_experts_per_tok=2)))
    torch.manual_seed(0)
    save_fp8_block(transformers.LlamaForCausalLM(transformers.LlamaConfig(**text())), root / "fp8")
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

    results = {}

    def run(name, src, **kwargs):
        res = pissa_rs.decompose_checkpoint(root / src, out=root / "out" / name, progress=False, **kwargs)
        for one in res if isinstance(res, list) else [res]:
            results[one.out.relative_to(root / "out").as_posix()] = digests(one.out, root)

    run("dense", "llama", r=4, niter=2)
    run("dense-exact", "llama", r=4, niter=0, adapter_dtype="bfloat16")
    run("ranks-r{r}", "llama", r=[2, 6], niter=2)
    run("qpissa", "llama", r=4, niter=2, quantize="nf4", quant_iters=2, save_quantized=True,
        measure_error=False)
    run("gpt-oss", "gpt-oss", r=4, niter=2, target_parameters=experts)
    run("mixtral", "mixtral", r=4, niter=2)
    run("fp8", "fp8", r=4, niter=2, measure_error=False)
    run("fp8-keep", "fp8", r=4, niter=2, keep_source_format=True, measure_error=False)
    run("two-devices", "gpt-oss", r=4, niter=2, target_parameters=experts, devices=["cpu", "cpu"])
    return results


def run_pinned(workdir: Path) -> dict[str, dict[str, str]]:
    """The runs in a child process with the pinned environment."""
    done = subprocess.run([sys.executable, __file__, str(workdir)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **PINNED_ENV})
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-4000:])
    return json.loads(done.stdout.splitlines()[-1])


if __name__ == "__main__":
    workdir = Path(sys.argv[1])
    if "--record" in sys.argv:
        FIXTURE.parent.mkdir(exist_ok=True)
        FIXTURE.write_text(json.dumps(run_pinned(workdir), indent=1, sort_keys=True) + "\n")
    else:
        sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]
        workdir.mkdir(parents=True, exist_ok=True)
        print(json.dumps(runs(workdir.resolve())))

"""The fixed runs whose output bytes are pinned in tests/data/same_bytes.json.

    python tests/same_bytes.py WORKDIR            prints what the runs wrote as JSON
    python tests/same_bytes.py WORKDIR --record   writes it into tests/data/same_bytes.json

Run it only through `run_pinned` (tests/test_same_bytes.py does): the environment it sets
makes torch, MKL and oneDNN take their baseline code paths on one thread, which takes the
core count and most of the vector extensions out of the bits. Not all: MKL still picks GEMM
code per CPU model (docs/design.md, "What decides the bytes"), so every run also records its
rounding probe (the report's), and, for machines whose probe differs from the recording's,
what each tensor holds in a form compared within a bound (`value_problems`). Paths are
replaced by ROOT and timings dropped before hashing the JSON files, which name both.

SAME_BYTES_EXTRA_ENV="NAME=VALUE ..." adds variables to the pinned environment (e.g.
MKL_CBWR=AVX2), to see the comparison hold on a machine that rounds differently.

The runs cover what the engine writes: dense sharded, several ranks, QPiSSA (T=2,
save_quantized), MoE with experts fused on disk (GPT-OSS) and per expert (Mixtral), an FP8
source (bf16 residual and keep_source_format), two CPU devices, and the other methods
(MiLoRA, MiCA: full SVDs; OLoRA: QR on experts stored in x out).
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
# keys whose values say when, where or with which library version, not what was computed
VOLATILE = ("seconds", "input", "out", "run", "quantizer", "base_model", "transformers_version")
SKETCH_ROWS = 32  # a Johnson-Lindenstrauss sketch: ||S d|| / sqrt(32) estimates ||d|| within ~1.5x
SAMPLED_BYTES = 256  # integer tensors (packed 4-bit codes): bytes kept at fixed positions
# The bound a tensor computed on a machine that rounds differently must keep:
# ||found - recorded||_F <= (FLOAT_SLACK + ulp(dtype) / 2) * ||reference||_F, the reference
# being the input weight of the same name (a residual) or the recorded tensor (a factor).
# Measured on this project's runs under other MKL / ATen code paths: <= 1.5e-5 for float32
# factors, 6e-4 for bfloat16 factors (bf16 ulp flips), 2e-4 for an FP8 residual.
FLOAT_SLACK = 1e-4
HALF_ULP = {"F32": 2.0**-24, "F16": 2.0**-11, "BF16": 2.0**-8, "F8_E4M3": 2.0**-4, "F8_E5M2": 2.0**-3}
MIN_SAME_BYTES = 0.9  # integer tensors: at least this share of the sampled bytes unchanged
REPORT_RTOL = {"error": 0.1, "reduction": 1e-3}  # by key substring; other floats 1e-4


def _peft_defaults() -> dict:
    """LoraConfig's fields at their defaults, as its save_pretrained writes them."""
    from peft import LoraConfig

    return json.loads(json.dumps(LoraConfig().to_dict(), default=list))


def _normalized(path: Path, root: Path):
    data = json.loads(path.read_text().replace(str(root), "ROOT"))
    if path.name == "adapter_config.json":  # what we chose, not which PEFT wrote it: a PEFT release
        # adds fields (0.22: astra_config) at their defaults, and names itself
        defaults = _peft_defaults()
        data = {k: v for k, v in data.items() if k != "peft_version" and (k not in defaults or v != defaults[k])}

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not any(k.endswith(s) for s in VOLATILE)}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(data)


def _normalized_json(path: Path, root: Path) -> bytes:
    return json.dumps(_normalized(path, root), sort_keys=True).encode()


def digests(out: Path, root: Path) -> dict[str, str]:
    found = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            data = _normalized_json(p, root) if p.suffix == ".json" else p.read_bytes()
            found[p.relative_to(out).as_posix()] = hashlib.sha256(data).hexdigest()
    return found


def _signs(rows: int, n: int):
    """A rows x n matrix of +-1 from an integer hash: the same on every machine."""
    import torch

    from pissa_rs.rounding import hashed_uniform

    return torch.where(hashed_uniform(rows * n, 1 << 40) < 0, -1.0, 1.0).to(torch.float64).reshape(rows, n)


def _positions(n: int, k: int):
    import torch

    return torch.unique((torch.arange(k, dtype=torch.int64) * 2654435761) % max(n, 1))


def tensor_values(out: Path, inputs: dict[str, "object"]) -> dict[str, dict[str, dict]]:
    """What each tensor of each safetensors file in `out` holds, for value_problems: dtype,
    shape, a digest, and whether it is a copy of the input tensor of that name; for a
    computed float tensor its norm and sketch (and the input's norm, the bound's scale), for
    a computed integer tensor its bytes at fixed positions."""
    import base64

    import torch
    from safetensors.torch import load_file

    values = {}
    for p in sorted(out.rglob("*.safetensors")):
        entries = {}
        for name, t in load_file(p).items():
            raw = t.contiguous().view(torch.uint8).reshape(-1)
            entry = {"dtype": str(t.dtype), "shape": list(t.shape),
                     "sha": hashlib.sha256(raw.numpy().tobytes()).hexdigest()[:16]}
            source = inputs.get(name)
            if source is not None and torch.equal(source.view(torch.uint8).reshape(-1), raw):
                entry["copy"] = True
            elif t.is_floating_point():
                x = _sign_canonical(name, t.to(torch.float64)).reshape(-1)
                entry["norm"] = x.norm().item()
                entry["sketch"] = base64.b64encode((_signs(SKETCH_ROWS, x.numel()) @ x).numpy().tobytes()).decode()
                if source is not None and source.is_floating_point() and source.shape == t.shape:
                    entry["reference_norm"] = source.to(torch.float64).norm().item()
            else:
                entry["sampled"] = raw[_positions(raw.numel(), SAMPLED_BYTES)].tolist()
            entries[name] = entry
        values[p.relative_to(out).as_posix()] = entries
    return values


def _sign_canonical(name: str, t):
    """A factor with the sign of each rank component fixed (the largest entry of each row of
    lora_A, each column of lora_B, made positive): a singular pair (u, v) and (-u, -v) are the
    same decomposition, and which sign an SVD returns is itself decided by rounding."""
    import torch

    axis = 1 if "lora_A" in name else 0 if "lora_B" in name else None
    if axis is None or t.dim() != 2:
        return t
    peak = t.gather(axis, t.abs().argmax(dim=axis, keepdim=True))
    return t * torch.where(peak < 0, -1.0, 1.0).to(t.dtype)


def value_problems(found: dict, recorded: dict) -> list[str]:
    """Where tensor_values of a run on a machine that rounds differently break the bound
    (module docstring): copies and integer tensors compared as they must be, floats by norm."""
    import base64
    import math

    import numpy as np
    import torch

    from pissa_rs.tensors import SAFETENSORS_DTYPES

    problems = []
    if sorted(found) != sorted(recorded):
        return [f"files {sorted(found)} (recorded: {sorted(recorded)})"]
    for file, tensors in recorded.items():
        if sorted(found[file]) != sorted(tensors):
            problems.append(f"{file}: tensors {sorted(found[file])} (recorded: {sorted(tensors)})")
            continue
        for name, rec in tensors.items():
            got = found[file][name]
            where = f"{file}:{name}"
            if (got["dtype"], got["shape"]) != (rec["dtype"], rec["shape"]):
                problems.append(f"{where}: {got['dtype']} {got['shape']} (recorded {rec['dtype']} {rec['shape']})")
            elif rec.get("copy") or got.get("copy"):
                if got["sha"] != rec["sha"] or not got.get("copy"):
                    problems.append(f"{where}: a copy of the input tensor, and its bytes changed")
            elif "sampled" in rec:
                same = sum(a == b for a, b in zip(got["sampled"], rec["sampled"])) / max(len(rec["sampled"]), 1)
                if same < MIN_SAME_BYTES:
                    problems.append(f"{where}: {same:.0%} of the sampled bytes unchanged (needs {MIN_SAME_BYTES:.0%})")
            else:
                scale = max(rec.get("reference_norm", 0.0), rec["norm"])
                dtype = SAFETENSORS_DTYPES[getattr(torch, rec["dtype"].removeprefix("torch."))]
                bound = (FLOAT_SLACK + HALF_ULP[dtype]) * scale
                sketch = [np.frombuffer(base64.b64decode(e["sketch"]), dtype=np.float64) for e in (got, rec)]
                estimate = float(np.linalg.norm(sketch[0] - sketch[1])) / math.sqrt(SKETCH_ROWS)
                if estimate > bound or abs(got["norm"] - rec["norm"]) > bound:
                    problems.append(f"{where}: moved by ~{estimate:.3g} (norm {got['norm']:.6g} vs recorded "
                                    f"{rec['norm']:.6g}); the bound is {bound:.3g}")
    return problems


def probe_problems(found: dict, recorded: dict, same_torch: bool) -> list[str]:
    """Where the runs' rounding probes contradict the recording in a way no machine explains
    (then the probe is wrong, not the machine: a cache key missing a field that decides the
    computation hands one run another's probe, and the byte comparison is skipped for it).
    `found`, `recorded`: run -> {"files", "rounding", ...}.

    - Two runs whose recorded probes differ must have different probes here, and two whose
      recorded probes are equal (the same computation) equal ones: which runs share a probe
      does not depend on how a machine rounds.
    - With the recording's torch, where every file of every run (the report aside: it names
      the probe) has the recorded bytes, this machine rounds as the recording one did: every
      run's probe must then be the recorded one. (Not asked of one run alone: the probe also
      spans larger GEMMs than a tiny run's, and docs/design.md records machines whose exact
      path wrote the recorded bytes while their randomized path did not.)"""
    problems = []
    runs = sorted(set(found) & set(recorded))
    for k, a in enumerate(runs):
        for b in runs[k + 1:]:
            was, now = recorded[a]["rounding"] == recorded[b]["rounding"], found[a]["rounding"] == found[b]["rounding"]
            if was != now:
                problems.append(f"runs {a} and {b}: {'one' if now else 'two'} rounding probe{'' if now else 's'} "
                                f"({found[a]['rounding']}, {found[b]['rounding']}), recorded "
                                f"{'one' if was else 'two'} ({recorded[a]['rounding']}, {recorded[b]['rounding']})")

    def same_bytes(run):
        files, expected = found[run]["files"], recorded[run]["files"]
        return sorted(files) == sorted(expected) and all(
            files[f] == h for f, h in expected.items() if not f.endswith("pissa_report.json"))

    if same_torch and runs and all(same_bytes(run) for run in runs):
        problems += [f"{run}: every output file has the recorded bytes, but its rounding probe "
                     f"{found[run]['rounding']} is not the recorded {recorded[run]['rounding']}: the probe is wrong "
                     "(this machine rounds as the recording's)" for run in runs
                     if found[run]["rounding"] != recorded[run]["rounding"]]
    return problems


def report_problems(found, recorded, path: str = "report") -> list[str]:
    """Two normalized reports' differences beyond rounding: every key, string, integer and
    bool the same, floats within REPORT_RTOL; the rounding probe itself aside."""
    if isinstance(recorded, dict):
        if not isinstance(found, dict) or sorted(found) != sorted(recorded):
            return [f"{path}: keys {sorted(found) if isinstance(found, dict) else found!r} "
                    f"(recorded {sorted(recorded)})"]
        return [p for k in recorded if k != "rounding" for p in report_problems(found[k], recorded[k], f"{path}.{k}")]
    if isinstance(recorded, list):
        if not isinstance(found, list) or len(found) != len(recorded):
            return [f"{path}: {found!r} (recorded {recorded!r})"]
        return [p for k, (a, b) in enumerate(zip(found, recorded)) for p in report_problems(a, b, f"{path}[{k}]")]
    if isinstance(recorded, float) and isinstance(found, (int, float)) and not isinstance(found, bool):
        rtol = next((v for key, v in REPORT_RTOL.items() if key in path.rsplit(".", 1)[-1]), 1e-4)
        if abs(found - recorded) > rtol * max(abs(found), abs(recorded)) + 1e-12:
            return [f"{path}: {found!r} (recorded {recorded!r}, rtol {rtol})"]
        return []
    return [] if found == recorded else [f"{path}: {found!r} (recorded {recorded!r})"]


def fixed_spread(model, path, **kwargs) -> None:
    """save_pretrained of `model` (float32) with every parameter set from an integer hash:
    torch's random init and randn round by the CPU's vector unit, and the runs' inputs must be
    the same bytes everywhere. Vectors are near 1 (norms); matrices have a decaying spectrum, as trained
    weights do, so the top-r subspace is well-posed and rounding moves it little."""
    import torch

    from pissa_rs.rounding import hashed_uniform

    model = model.float().eval()
    with torch.no_grad():
        for k, (_, p) in enumerate(model.named_parameters()):
            u = hashed_uniform(p.numel(), k * 7_919_993).reshape(p.shape)
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * u)
            else:  # columns scaled down the line: separated leading singular values, a well-posed top-r
                p.copy_(0.1 * u / (1.0 + torch.arange(p.shape[-1], dtype=torch.float64) / 4.0))
    model.save_pretrained(path, **kwargs)


def runs(root: Path) -> dict[str, dict[str, str]]:
    import low_precision
    import transformers
    from helpers import text
    from low_precision import save_fp8_block

    import pissa_rs

    def llama(path):
        fixed_spread(transformers.LlamaForCausalLM(transformers.LlamaConfig(**text())), path, max_shard_size="100KB")

    def moe(path, cls, config):
        fixed_spread(cls(config), path, max_shard_size="100KB")

    low_precision.save_spread = fixed_spread  # the FP8 source from the same weights
    llama(root / "llama")
    moe(root / "gpt-oss", transformers.GptOssForCausalLM, transformers.GptOssConfig(**text(
        num_local_experts=4, num_experts_per_tok=2, head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})))
    moe(root / "mixtral", transformers.MixtralForCausalLM,
        transformers.MixtralConfig(**text(num_local_experts=4, num_experts_per_tok=2)))
    save_fp8_block(transformers.LlamaForCausalLM(transformers.LlamaConfig(**text())), root / "fp8")
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

    from safetensors.torch import load_file

    if os.environ.get("SAME_BYTES_PLANT") == "niter-1":  # a planted bug, for test_same_bytes only
        import pissa_rs.factors

        real = pissa_rs.factors.randomized_svd
        pissa_rs.factors.randomized_svd = lambda a, q, niter, seed=None: real(a, q, niter - 1, seed)
    only = os.environ.get("SAME_BYTES_ONLY")
    results = {}

    def run(name, src, **kwargs):
        if only and name != only:
            return
        res = pissa_rs.decompose_checkpoint(root / src, out=root / "out" / name, progress=False, **kwargs)
        inputs = {k: v for f in sorted((root / src).glob("*.safetensors")) for k, v in load_file(f).items()}
        for one in res if isinstance(res, list) else [res]:
            results[one.out.relative_to(root / "out").as_posix()] = {
                "files": digests(one.out, root), "rounding": one.report["rounding"]["probe"],
                "tensors": tensor_values(one.out, inputs), "report": _normalized(one.out / "pissa_report.json", root)}

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
    # the other methods: full SVDs (bottom triplets; MiCA's adapter alone) and QR, on experts stored in x out
    run("milora", "llama", r=4, method="milora")
    run("mica", "llama", r=4, method="mica")
    run("olora", "gpt-oss", r=4, method="olora", target_parameters=experts)
    return results


def pinned_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    added = dict(item.split("=", 1) for item in os.environ.get("SAME_BYTES_EXTRA_ENV", "").split() if "=" in item)
    return {**os.environ, **PINNED_ENV, **added, **(extra or {})}


def run_pinned(workdir: Path, extra_env: dict[str, str] | None = None) -> dict[str, dict]:
    """The runs in a child process with the pinned environment: per run, its files' digests,
    its rounding probe, its tensors' values and its normalized report."""
    done = subprocess.run([sys.executable, __file__, str(workdir)], capture_output=True, text=True, timeout=900,
                          env=pinned_env(extra_env))
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-4000:])
    return json.loads(done.stdout.splitlines()[-1])


def recording(found: dict[str, dict]) -> dict:
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"torch": torch.__version__.split("+")[0], "recorded_on": cpu, "runs": found}


if __name__ == "__main__":
    places = [a for a in sys.argv[1:] if not a.startswith("-")]
    if len(places) != 1:  # (a flag taken for WORKDIR would make the child record again, and so on)
        sys.exit(__doc__)
    workdir = Path(places[0])
    if "--record" in sys.argv:
        FIXTURE.parent.mkdir(exist_ok=True)
        FIXTURE.write_text(json.dumps(recording(run_pinned(workdir)), indent=1, sort_keys=True) + "\n")
    else:
        sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]
        workdir.mkdir(parents=True, exist_ok=True)
        print(json.dumps(runs(workdir.resolve())))

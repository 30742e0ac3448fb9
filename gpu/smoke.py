"""Every CUDA path of pissa_rs once, small: each check prints its verdict with its numbers and
is written to OUT/smoke.json as it starts ("running") and as it ends, so a run killed by its
time box still says what passed and which check it was in (a run adds to the file it finds).

    python gpu/smoke.py OUT          from the repository root
    SMOKE_DEVICE=cpu                 run on the CPU (a rehearsal: the GPU-vs-CPU checks then
                                     compare the CPU with itself; the CUDA-only ones say so)
    SMOKE_ONLY=factors,tf32          these checks only; SMOKE_SKIP=fullsvd: all but these

Verdicts: pass, fail, info (numbers only), skipped: no CUDA. Exit status 1 when a check failed.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
for folder in ("tests", "examples"):  # helpers.py, make_tiny_model.py
    if str(ROOT / folder) not in sys.path:
        sys.path.insert(0, str(ROOT / folder))

PASS, FAIL, INFO, NO_CUDA = "pass", "fail", "info", "skipped: no CUDA"
CHECKS: dict[str, tuple[Callable, bool]] = {}  # name -> (check, CUDA only), in the order they run


def check(name: str, cuda_only: bool = False):
    def register(fn):
        CHECKS[name] = (fn, cuda_only)
        return fn
    return register


class Smoke:
    """The results of one run, written to OUT/smoke.json after every change."""

    def __init__(self, out: Path, device: torch.device):
        self.out, self.device = Path(out), device
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "smoke.json"
        self.folders: list[Path] = []
        # several runs into one OUT (check.sh's smoke and svd steps) add to one file
        self.results: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.path)

    def work_dir(self) -> Path:
        """A folder for the running check's files, removed when the check ends (a whole run left
        ~30 MB a check in /tmp before; a run killed by its time box still leaves its last one)."""
        self.folders.append(Path(tempfile.mkdtemp(prefix="pissa-smoke-")))
        return self.folders[-1]

    def progress(self, name: str, detail) -> None:
        """A running check's numbers so far (kept if it is killed before it ends)."""
        self.results[name]["detail"] = detail
        self.write()

    def run(self, name: str) -> str:
        fn, cuda_only = CHECKS[name]
        t0 = time.perf_counter()
        if cuda_only and self.device.type != "cuda":
            verdict, detail = NO_CUDA, None
        else:
            self.results[name] = {"verdict": "running", "detail": None, "started": time.strftime("%H:%M:%S")}
            self.write()
            print(f"[running] {name}", flush=True)
            try:
                verdict, detail = fn(self)
            except Exception as e:  # noqa: BLE001 (a check's failure is its verdict; the next one runs)
                traceback.print_exc()
                verdict, detail = FAIL, f"{type(e).__name__}: {e}"[:1500]
            finally:
                while self.folders:
                    shutil.rmtree(self.folders.pop(), ignore_errors=True)
        self.results[name] = {"verdict": verdict, "detail": detail, "s": round(time.perf_counter() - t0, 2)}
        self.write()
        print(f"[{verdict}] {name} ({self.results[name]['s']} s): {json.dumps(detail, default=str)[:2000]}",
              flush=True)
        return verdict


def selected(only: str = "", skip: str = "") -> list[str]:
    want = [n for n in only.split(",") if n]
    unknown = [n for n in want + [n for n in skip.split(",") if n] if n not in CHECKS]
    if unknown:
        raise SystemExit(f"smoke.py: no check {unknown}; the checks: {', '.join(CHECKS)}")
    return [n for n in CHECKS if (not want or n in want) and n not in skip.split(",")]


# -- helpers -------------------------------------------------------------------------------

def spectrum(rows: int, cols: int, decay: float, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """A matrix with singular values k**-decay (times 0.05): a trained weight's shape of spectrum."""
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -decay * 0.05
    return ((u * s) @ v.T).to(dtype)


def error_over_allowed(w: torch.Tensor, f, scale: float) -> float:
    """max |W - (W_res + s B@A)| over what the design allows (half an ulp of W_res plus the
    float32 product's rounding in any summation order, verify's 2 r eps32 |s B| |A|), in
    float64 on the CPU. <= 1: within the bound."""
    w64, res = w.double().cpu(), f.residual.cpu()
    a, b = f.lora_A.double().cpu(), f.lora_B.double().cpu()
    rec = res.double() + scale * (b @ a)
    info = torch.finfo(res.dtype)
    mag = torch.maximum(res.double().abs(), torch.full_like(w64, info.tiny))
    half_ulp = 0.5 * torch.exp2(torch.floor(torch.log2(mag))) * info.eps
    allowed = half_ulp + 2 * a.shape[0] * 2.0**-23 * (scale * b.abs() @ a.abs())
    return ((w64 - rec).abs() / allowed).max().item()


def tiny_model(folder: Path, **kwargs) -> Path:
    from make_tiny_model import save_tiny_model

    return save_tiny_model(folder / "m", "llama", **{"layers": 2, "dtype": "bfloat16", "shard_size": "150KB",
                                                     "decay": 0.7, **kwargs})


def decompose(model: Path, out: Path, **kwargs):
    import pissa_rs

    return pissa_rs.decompose_checkpoint(model, out=out, progress=False, **{"r": 8, **kwargs})


def matmul_state() -> dict:
    """The caller's float32 matmul settings, through the library's reader where it has one."""
    try:
        from pissa_rs.precision import float32_matmul_state

        return dict(float32_matmul_state())
    except ImportError:
        return {"float32_matmul_precision": torch.get_float32_matmul_precision(),
                "cuda_allow_tf32": str(torch.backends.cuda.matmul.allow_tf32)}




# -- the checks ----------------------------------------------------------------------------

@check("factors")
def _factors(smoke: Smoke):
    """factors_at_ranks on the device against the CPU, each dtype and niter (0: full SVD, gesvd
    on CUDA; 4: the randomized SVD, CholeskyQR2 on CUDA): the reconstruction bound on the
    device's output, the singular values within 1e-4 of S[0] of the CPU's."""
    from pissa_rs.factors import factors_at_ranks

    dev, worst, rows = smoke.device, 0.0, []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = spectrum(768, 2048, 0.7, 1, dtype)
        for niter in (0, 4):
            ours = factors_at_ranks(w.to(dev), [(32, 2.0), (8, 2.0)], niter=niter, seed=5)
            cpu = factors_at_ranks(w, [(32, 2.0), (8, 2.0)], niter=niter, seed=5) if dev.type != "cpu" else ours
            for g, c in zip(ours, cpu):
                off = error_over_allowed(w, g, 2.0)
                sv = ((g.singular_values.cpu() - c.singular_values).abs().max() / c.singular_values[0]).item()
                worst = max(worst, off)
                rows.append([str(dtype).removeprefix("torch."), niter, g.lora_A.shape[0], round(off, 3), f"{sv:.1e}"])
                if off > 1.0 or sv > 1e-4:
                    return FAIL, {"bad (dtype, niter, r, error/allowed, sv rel)": rows[-1], "rows": rows}
    return PASS, {"worst error/allowed (<= 1)": round(worst, 3), "rows (dtype, niter, r, error/allowed, sv rel)": rows}


@check("tf32")
def _tf32(smoke: Smoke):
    """A caller that turned TF32 on (each of torch's ways) gets the bytes of a caller that did
    not: the library pins IEEE float32 inside its runs; and its settings back afterwards."""
    import pissa_rs
    from helpers import same_output

    dev = smoke.device
    folder = smoke.work_dir()
    model = tiny_model(folder)
    w = spectrum(1024, 3072, 0.7, 2, torch.bfloat16).to(dev)
    default = matmul_state()
    reference = decompose(model, folder / "ieee", device=str(dev))
    ref_factors = pissa_rs.principal_factors(w, 64, 2.0, niter=4, seed=5)

    def legacy():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("high")

    def legacy_medium():  # "medium" also sends the CPU's oneDNN float32 matmuls to bfloat16
        torch.set_float32_matmul_precision("medium")

    def per_backend():
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.mkldnn.matmul.fp32_precision = "tf32"

    per_backend_api = hasattr(torch.backends.cuda.matmul, "fp32_precision")

    def save():
        if per_backend_api:
            return ({b: getattr(torch.backends, b).matmul.fp32_precision for b in ("cuda", "mkldnn")},
                    torch.backends.fp32_precision)
        return torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32

    def put(saved):
        if per_backend_api:
            torch.backends.fp32_precision = saved[1]
            for b, value in saved[0].items():
                getattr(torch.backends, b).matmul.fp32_precision = value
        else:
            torch.set_float32_matmul_precision(saved[0])
            torch.backends.cuda.matmul.allow_tf32 = saved[1]

    start = save()
    reset = functools.partial(put, start)  # this process's settings as the check found them

    ways = {"allow_tf32 + precision high": legacy, "precision medium": legacy_medium}
    if per_backend_api:
        ways["per-backend fp32_precision tf32"] = per_backend
    found, ok = {}, True
    try:
        for k, (name, turn_on) in enumerate(ways.items()):
            reset()
            turn_on()
            before = matmul_state()
            run = decompose(model, folder / f"on{k}", device=str(dev))
            after_run = matmul_state()
            f = pissa_rs.principal_factors(w, 64, 2.0, niter=4, seed=5)
            after_factors = matmul_state()
            try:
                same_output(run.out, reference.out)
                same = True
            except AssertionError:
                same = False
            same_factors = all(torch.equal(getattr(f, k), getattr(ref_factors, k))
                               for k in ("lora_A", "lora_B", "residual"))
            restored = before == after_run == after_factors
            ok &= same and same_factors and restored
            found[name] = {"set": before, "same bytes": same, "same factors": same_factors,
                           "settings back": restored, **({} if restored else {"after": after_run})}
    finally:
        reset()
    return (PASS if ok else FAIL), {"default": default, "ways": found}


@check("cholqr2")
def _cholqr2(smoke: Smoke):
    """randomized_svd's bases on the device: orthonormal on easy and ill-conditioned spectra
    (CholeskyQR2 on CUDA, Householder where Cholesky is unsafe: counted), S against the CPU's."""
    from unittest import mock

    from pissa_rs import svd

    dev, out = smoke.device, {}
    for decay in (0.3, 1.0, 4.0):
        a = spectrum(4096, 1024, decay, 3)
        calls = []
        real = torch.linalg.qr
        with mock.patch.object(svd.torch.linalg, "qr", lambda x, *args, **kw: calls.append(1) or real(x, *args, **kw)):
            u, s, v = svd.randomized_svd(a.to(dev), 128, 4, 11)
        s_cpu = svd.randomized_svd(a, 128, 4, 11)[1] if dev.type != "cpu" else s
        eye = torch.eye(128, dtype=torch.float64)
        orth = max((m.double().cpu().T @ m.double().cpu() - eye).abs().max().item() for m in (u, v))
        sv = ((s.cpu() - s_cpu).abs().max() / s_cpu[0]).item()
        out[str(decay)] = {"orthogonality": f"{orth:.1e}", "sv rel": f"{sv:.1e}", "householder qr calls": len(calls)}
        if orth > 1e-5 or sv > 1e-4:
            return FAIL, out
    return PASS, out


@check("methods")
def _methods(smoke: Smoke):
    """Every method of pissa_rs.methods on the device against the CPU: energy kept, singular
    values, and the reconstruction bound where it keeps a residual."""
    import pissa_rs.methods as methods

    dev = smoke.device
    w = spectrum(512, 1408, 0.8, 4, torch.bfloat16)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2000, 1408, generator=g)
    stats = {"covariance": x.T @ x / 2000,
             "components": torch.linalg.qr(torch.randn(1408, 64, generator=g)).Q.T.contiguous()}
    out, ok = {}, True
    for name in methods.method_names():
        m = methods.get_method(name)
        stat = stats.get(m.calibration) if m.calibration else ((w.float() * 0.9).to(torch.bfloat16) if m.reads_base
                                                               else None)
        res = {}
        for where in (dev, torch.device("cpu")) if dev.type != "cpu" else (dev,):
            res[where.type] = m.factors_at_ranks(w.to(where), [(16, 2.0)], niter=4, seed=1, adapter_dtype=torch.float32,
                                                 fan_in_fan_out=False,
                                                 statistic=None if stat is None else stat.to(where))[0]
        g_, c = res[dev.type], res.get("cpu", res[dev.type])
        sv = ((g_.singular_values.cpu() - c.singular_values).abs().max() / (c.singular_values.abs().max() + 1e-30)
              ).item() if c.singular_values.numel() else 0.0
        bound = None if g_.residual is None else round(error_over_allowed(w, g_, 2.0), 3)
        energy = abs(g_.energy_kept - c.energy_kept) <= 1e-4 * max(abs(c.energy_kept), 1e-12) + 1e-7
        good = energy and sv <= 1e-3 and (bound is None or bound <= 1.0)
        ok &= good
        out[name] = {"ok": good, "energy_kept": [g_.energy_kept, c.energy_kept], "sv rel": f"{sv:.1e}",
                     "error/allowed": bound}
        smoke.progress("methods", out)
    return (PASS if ok else FAIL), out


@check("quantizer")
def _quantizer(smoke: Smoke):
    """The quantizer the device gets (bitsandbytes' kernels where they equal the reference)
    against the reference, and the reference on the device against the CPU's, bit for bit."""
    from pissa_rs.formats import bnb_reference as ref
    from pissa_rs.quant import BITSANDBYTES, Quantization, choose_quantizer

    dev, out, ok = smoke.device, {}, True
    x = spectrum(512, 704, 0.5, 5, torch.bfloat16)
    for kind, dq in (("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True), ("int8", False)):
        q = Quantization(kind, double_quant=dq)
        choice = choose_quantizer(q, dev.type)
        if kind == "int8":
            on_dev = ref.int8_rows_dequantize(*ref.int8_rows_quantize(x.to(dev))).to(x.dtype)
            on_cpu = ref.int8_rows_dequantize(*ref.int8_rows_quantize(x)).to(x.dtype)
        else:
            on_dev = ref.dequantize_4bit(ref.quantize_4bit(x.to(dev), kind, 64, dq))
            on_cpu = ref.dequantize_4bit(ref.quantize_4bit(x, kind, 64, dq))
        same_ref = torch.equal(on_dev.cpu(), on_cpu)
        chosen = torch.equal(q.roundtrip(x.to(dev)).cpu(), on_cpu)
        # on a GPU, bitsandbytes' kernels are what training loads with: they must be the choice
        backend_ok = dev.type != "cuda" or choice.backend == BITSANDBYTES
        ok &= same_ref and chosen and backend_ok
        out[f"{kind}{'-dq' if dq else ''}"] = {"backend": choice.backend, "reason": choice.reason,
                                             "reference device == cpu": same_ref, "chosen == reference": chosen}
    return (PASS if ok else FAIL), out


@check("runner")
def _runner(smoke: Smoke):
    """The device runner with 1 and 2 workers on the same device: every weight back, in order,
    its bytes and a checksum computed on the device right (pinned buffers, the side stream)."""
    from safetensors.torch import save_file

    import pissa_rs
    from pissa_rs.engine.devices import DeviceRunner

    dev = smoke.device
    cuda = dev.type == "cuda"
    count, busy = (96, 8) if cuda else (24, 1)
    folder = smoke.work_dir()
    g = torch.Generator().manual_seed(7)
    tensors = {f"t{i:03d}": (torch.randn(512 + 64 * (i % 5), 1024, generator=g) * (i + 1)).bfloat16()
               for i in range(count)}
    save_file(tensors, folder / "model.safetensors")
    ck = pissa_rs.Checkpoint(folder)
    names = sorted(tensors)
    out = {}

    def compute(i, weight, to_host):
        x = weight.float()
        for _ in range(busy):  # keep the device busy while the next upload runs
            x = torch.tanh(x @ x.T[:, :1024] / 32)
        # a copy: on the CPU the weight is the reused host buffer itself
        return to_host(weight.clone()), to_host(weight.view(torch.int16).to(torch.int64).sum()), to_host(x[:4])

    for devices in ([dev], [dev, dev]):
        t0 = time.perf_counter()
        seen, bad = [], []
        with DeviceRunner(ck, list(enumerate(names)), devices, compute) as runner:
            for i, (w, s, _) in runner.results():  # checked as each comes: its host buffer is reused after
                seen.append(i)
                expected = tensors[names[i]]
                if not torch.equal(w, expected) or s.item() != expected.view(torch.int16).to(torch.int64).sum().item():
                    bad.append(i)
        order = seen == list(range(count))
        out[f"{len(devices)} worker(s)"] = {"in order": order, "wrong": bad, "s": round(time.perf_counter() - t0, 2),
                                            "buffers": getattr(runner.buffers, "made", None)}
        smoke.progress("runner", out)
        if bad or not order:
            return FAIL, out
    if cuda and hasattr(torch.cuda, "host_memory_stats"):
        out["pinned host memory"] = {k: v for k, v in torch.cuda.host_memory_stats().items()
                                     if k.endswith("bytes.current")}
    return PASS, out


@check("decompose")
def _decompose(smoke: Smoke):
    """A tiny model end to end on the device: verify passes, the singular values are the CPU
    run's, and two workers on the device write the bytes of one."""
    import pissa_rs
    from helpers import same_output

    dev = smoke.device
    folder = smoke.work_dir()
    model = tiny_model(folder)
    ours, cpu = decompose(model, folder / "dev", device=str(dev)), decompose(model, folder / "cpu", device="cpu")
    verified = pissa_rs.verify(ours.out, against=model)
    sv = max(max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a["singular_values"], b["singular_values"]))
             for a, b in zip(ours.report["tensors"], cpu.report["tensors"]))
    two = decompose(model, folder / "two", devices=[str(dev), str(dev)])
    same_output(two.out, ours.out)
    ok = verified.ok and sv <= 1e-3
    return (PASS if ok else FAIL), {"verify": verified.ok, "sv rel vs cpu": f"{sv:.1e}",
                                    "two workers == one": True, "rounding": ours.report.get("rounding"),
                                    "targets": len(ours.report["tensors"])}


@check("qpissa")
def _qpissa(smoke: Smoke):
    """QPiSSA on the device: nf4 with double quantization saved quantized, int8 against LoftQ;
    verify passes on both, the saved residual is smaller."""
    import pissa_rs

    dev = smoke.device
    folder = smoke.work_dir()
    model = tiny_model(folder)
    out, ok = {}, True
    for kw in ({"quantize": "nf4", "double_quant": True, "quant_iters": 2, "save_quantized": True},
               {"quantize": "nf4", "double_quant": True, "quant_iters": 2},
               {"quantize": "int8", "quant_iters": 2, "compare_loftq": True}):
        name = kw["quantize"] + ("-saved" if kw.get("save_quantized") else "")
        res = decompose(model, folder / name, device=str(dev), **kw)
        verified = pissa_rs.verify(res.out, against=model).ok
        ok &= verified
        totals = res.report["totals"]
        out[name] = {"verify": verified, "quantizer": res.report.get("quantizer"), "bytes": totals["bytes_written"],
                     **{k: v for k, v in totals.items() if "error" in k}}
        smoke.progress("qpissa", out)
    smaller = out["nf4-saved"]["bytes"] < out["nf4"]["bytes"]
    out["saved quantized is smaller"] = smaller
    return (PASS if ok and smaller else FAIL), out


@check("fork")
def _fork(smoke: Smoke):
    """CUDA initialised in this process, then a decomposition that plans in a child process
    (PLAN_IN_CHILD_ABOVE_BYTES = 0) with rank_budget=True (its spectra pass first)."""
    import pissa_rs
    import pissa_rs.decompose as dec
    from pissa_rs.planning import plan

    dev = smoke.device
    folder = smoke.work_dir()
    model = tiny_model(folder)
    torch.zeros(1, device=dev)  # the parent's CUDA context exists before any child starts
    saved = dec.PLAN_IN_CHILD_ABOVE_BYTES, plan.PLAN_IN_CHILD_ABOVE_BYTES
    dec.PLAN_IN_CHILD_ABOVE_BYTES = plan.PLAN_IN_CHILD_ABOVE_BYTES = 0
    try:
        res = decompose(model, folder / "o", device=str(dev), rank_budget=True)
    finally:
        dec.PLAN_IN_CHILD_ABOVE_BYTES, plan.PLAN_IN_CHILD_ABOVE_BYTES = saved
    verified = pissa_rs.verify(res.out, against=model).ok
    ranks = sorted({t["r"] for t in res.report["tensors"]})
    return (PASS if verified else FAIL), {"verify": verified, "ranks chosen": ranks,
                                          "cuda initialized in parent": dev.type == "cuda" and torch.cuda.is_initialized()}


@check("fullsvd", cuda_only=True)
def _fullsvd(smoke: Smoke):
    """cuSOLVER's full-SVD drivers: torch's default (gesvdj, then gesvd where it fails) against
    gesvd (the library's choice, svd.CUDA_FULL_SVD_DRIVER): time at 4096 x 4096 and at a 70B
    MLP's 8192 x 28672 where memory allows, and the smallest singular values' accuracy on a
    decaying spectrum against float64 on the CPU. Numbers only."""
    dev, out = smoke.device, {}
    a = spectrum(1024, 1024, 2.0, 6)  # singular values 0.05 k^-2: down to ~5e-8
    exact = torch.linalg.svdvals(a.double())
    for driver in (None, "gesvd", "gesvdj", "gesvda"):
        try:
            s = torch.linalg.svdvals(a.to(dev), driver=driver).double().cpu()
            out[f"bottom-64 rel error, {driver or 'default'}"] = f"{((s - exact).abs() / exact)[-64:].max().item():.1e}"
        except Exception as e:  # noqa: BLE001
            out[f"bottom-64 rel error, {driver or 'default'}"] = f"{type(e).__name__}: {str(e)[:200]}"
        smoke.progress("fullsvd", out)
    free, _ = torch.cuda.mem_get_info(dev)
    budget = float(os.environ.get("SMOKE_SECONDS", "0")) or float("inf")  # the step's time box, if any
    started, first = time.perf_counter(), {}
    for shape in ((4096, 4096), (8192, 28672)):
        name = f"{shape[0]}x{shape[1]}"
        need = 4 * shape[0] * shape[1] * 4  # A, U/Vh, workspace: a generous guess
        if need > 0.8 * free:
            out[name] = f"skipped: needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} free"
            continue
        x = torch.randn(*shape, device=dev, generator=torch.Generator(dev).manual_seed(0))
        torch.linalg.svd(x[:256, :256], full_matrices=False)  # cuSOLVER's handle and workspace, untimed
        for driver in ("gesvd", None):
            if driver in first:  # a thin SVD costs ~ m n^2: expect the 4096^2 time times that ratio
                guess = first[driver] * shape[1] * shape[0] ** 2 / 4096**3
                if time.perf_counter() - started + guess > 0.8 * budget:
                    out[f"{name} {driver or 'default'} s"] = f"skipped: ~{guess:.0f} s expected, past the time box"
                    continue
            torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            torch.linalg.svd(x, full_matrices=False, driver=driver)
            torch.cuda.synchronize(dev)
            took = time.perf_counter() - t0
            first.setdefault(driver, took)
            out[f"{name} {driver or 'default'} s"] = round(took, 2)
            smoke.progress("fullsvd", out)
        out[f"{shape[0]}x{shape[1]} peak GiB"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        del x
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    return INFO, out


def main(argv: list[str]) -> int:
    out = Path(argv[1] if len(argv) > 1 else "gpu-results")
    device = torch.device(os.environ.get("SMOKE_DEVICE") or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    names = selected(os.environ.get("SMOKE_ONLY", ""), os.environ.get("SMOKE_SKIP", ""))
    import pissa_rs

    print(f"smoke on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'the CPU'}): "
          f"pissa_rs {pissa_rs.__version__} from {Path(pissa_rs.__file__).parent}, torch {torch.__version__}; "
          f"checks {', '.join(names)}", flush=True)
    smoke = Smoke(out, device)
    verdicts = {name: smoke.run(name) for name in names}
    print(f"== smoke: {json.dumps(verdicts)}", flush=True)
    return 1 if FAIL in verdicts.values() else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

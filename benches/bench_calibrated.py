"""Benchmark: CorDA-IPM, EVA and LoRA-GA out of core (pissa_rs, one decoder layer at a time)
against PEFT's own preprocess_corda + get_peft_model, initialize_lora_eva_weights and
preprocess_loraga on the whole model, same checkpoint, same samples.

    python benches/bench_calibrated.py [--layers 4] [--samples 64] [--length 256] [--batch 8]
        [--methods pissa_rs,peft,pissa_rs_eva,peft_eva,pissa_rs_lora_ga,peft_lora_ga]
        [--shapes tinyllama|llama3-8b]
        [--steps N] [--dtype float32|bfloat16] [--json OUT.json] [--smoke]

The checkpoint is bench_decompose.py's synthetic one (TinyLlama-1.1B shapes by default, bf16,
random weights) plus a byte-level BPE tokenizer trained on the docstrings of installed
packages; the samples are those docstrings cut into chunks of about `length` tokens. Each
method runs in its own process: wall time after imports, peak RSS (VmHWM). pissa_rs also
reports its time split (calibration forward, covariances, decomposition and writing, saving
the carried activations). `--methods pissa_rs` with `--layers 1` and `--layers 8` gives peak
RSS against depth. `--dtype`: the dtype the layers run in on both sides (pissa_rs's
calibration_dtype, the dtype PEFT's model is loaded in); float32 by default, pissa_rs's own
default on a CPU.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_decompose import HARNESS, PROJECTIONS, machine, make_checkpoint, run_script  # noqa: E402

# Each method's runner: (imports, body), with SRC, OUT, R and TARGETS given by the harness.
OURS = """
texts = json.load(open(os.environ["BENCH_CALIBRATION"]))
class _Stopped(BaseException):  # --steps: EVA's loop ended after its first steps
    pass
if int(os.environ["BENCH_STEPS"]):
    from pissa_rs.engine import components
    _step, _taken = components._step, [0]
    def _counted(*args, **kwargs):
        if _taken[0] == int(os.environ["BENCH_STEPS"]):
            raise _Stopped
        _taken[0] += 1
        return _step(*args, **kwargs)
    components._step = _counted
try:
    res = pissa_rs.decompose_checkpoint(SRC, r=R, target_modules=TARGETS, out=OUT, progress=False, method="{method}",
                                        calibration=texts, calibration_samples=len(texts), calibration_batch=int(os.environ["BENCH_BATCH"]),
                                        calibration_length=int(os.environ["BENCH_LENGTH"]),
                                        calibration_dtype=os.environ["BENCH_DTYPE"])
    open(os.environ["BENCH_SPLIT"], "w").write(json.dumps(res.report["calibration"]["seconds"]))
except _Stopped:
    open(os.environ["BENCH_SPLIT"], "w").write(json.dumps({"steps": _taken[0]}))
"""
# PEFT's side: the whole model in memory, loaded in the benchmark's dtype, and the model's own tokenizer
PEFT = """
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
texts = json.load(open(os.environ["BENCH_CALIBRATION"]))
length = int(os.environ["BENCH_LENGTH"])
model = AutoModelForCausalLM.from_pretrained(SRC, dtype=getattr(torch, os.environ["BENCH_DTYPE"])).eval()
tokenizer = AutoTokenizer.from_pretrained(SRC)"""
# The samples as pissa_rs batches them (and PEFT's EVA dataloader): right-padded, with their mask
BATCHES = """
rows = [tokenizer(t, truncation=True, max_length=length)["input_ids"] for t in texts]
batches = []
batch = int(os.environ["BENCH_BATCH"])
for k in range(0, len(rows), batch):
    chunk = rows[k:k + batch]
    ids = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(chunk):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    batches.append({"input_ids": ids, "attention_mask": mask})
"""
RUNNERS = {
    "pissa_rs": ("import os, torch, pissa_rs", OURS.replace("{method}", "corda-ipm")),
    "pissa_rs_eva": ("import os, torch, pissa_rs", OURS.replace("{method}", "eva")),
    "pissa_rs_lora_ga": ("import os, torch, pissa_rs", OURS.replace("{method}", "lora-ga")),
    # PEFT's LoRA-GA as its docs run it: preprocess_loraga with a train_step over the batches,
    # the whole model and every target's full-size gradient in memory
    "peft_lora_ga": ("import os, torch, peft, transformers", PEFT + BATCHES + """
from peft.tuners.lora.config import LoraGAConfig
from peft.tuners.lora.loraga import preprocess_loraga
config = LoraConfig(r=R, lora_alpha=R, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights="lora_ga",
                    lora_ga_config=LoraGAConfig(), task_type="CAUSAL_LM")
def train_step():
    for b in batches:
        model(**b, labels=b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)).loss.backward()
preprocess_loraga(model, config, train_step)
model = get_peft_model(model, config)
model.peft_config["default"].init_lora_weights = True
model.save_pretrained(os.path.join(OUT, "pissa_init"))
model = model.unload()
model.save_pretrained(OUT)
"""),
    "peft": ("import os, torch, peft, transformers", PEFT + """
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda
config = LoraConfig(r=R, lora_alpha=R, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights="corda",
                    corda_config=CordaConfig(corda_method="ipm"), task_type="CAUSAL_LM")
def run_model():
    for text in texts:
        model(**tokenizer(text, truncation=True, max_length=length, return_tensors="pt"))
preprocess_corda(model, config, run_model=run_model)
model = get_peft_model(model, config)
model.peft_config["default"].init_lora_weights = True
model.save_pretrained(os.path.join(OUT, "pissa_init"))
model = model.unload()
model.save_pretrained(OUT)
"""),
    # PEFT's EVA as its docs run it: the dataloader's right-padded batches with their mask;
    # the base weights are not changed, so only the adapter is written.
    "peft_eva": ("import os, torch, peft, transformers", PEFT + """
from peft.tuners.lora.config import EvaConfig
from peft.tuners.lora.eva import initialize_lora_eva_weights
config = LoraConfig(r=R, lora_alpha=R, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights="eva",
                    eva_config=EvaConfig(), task_type="CAUSAL_LM")
model = get_peft_model(model, config)""" + BATCHES + """
class _Stopped(BaseException):  # --steps: the loop ended after its first steps
    pass
_calls = [0]
def forward_fn(model, inputs):  # PEFT's forward_fn_dict; its first call is the hashing pass, not a step
    if int(os.environ["BENCH_STEPS"]) and _calls[0] == int(os.environ["BENCH_STEPS"]) + 1:
        raise _Stopped
    _calls[0] += 1
    return model(**inputs)
try:
    initialize_lora_eva_weights(model, batches, forward_fn=forward_fn, show_progress_bar=False)
    model.save_pretrained(os.path.join(OUT, "adapter"))
except _Stopped:
    open(os.environ["BENCH_SPLIT"], "w").write(json.dumps({"steps": _calls[0] - 1}))
"""),
}


def docstrings() -> str:
    """Text this machine has: the docstrings of torch's and transformers' public names."""
    import torch
    import transformers

    found = []
    for module in (torch, torch.nn, torch.linalg, transformers):
        for name in sorted(dir(module)):
            try:
                doc = inspect.getdoc(getattr(module, name))
            except Exception:  # noqa: BLE001 - lazy modules may fail to import an attribute
                continue
            if doc and len(doc) > 200:
                found.append(doc)
    return "\n\n".join(dict.fromkeys(found))


def add_tokenizer(path: Path, text: str, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator([text], trainers.BpeTrainer(vocab_size=min(vocab, 8000),
                                                              special_tokens=["<unk>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="samples per forward (EVA's batches; pissa_rs' CorDA too)")
    ap.add_argument("--shapes", choices=["tinyllama", "llama3-8b"], default="tinyllama")
    ap.add_argument("--methods", default="pissa_rs,peft,pissa_rs_eva,peft_eva")
    ap.add_argument("--steps", type=int, default=0,
                    help="EVA: end both loops after their first N steps (0: run to convergence); at full depth a "
                         "whole run takes hours on a CPU, and the loop's memory is reached by its second step")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="the dtype the layers run in, on both sides (the checkpoint is bf16)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script, not the speed")
    args = ap.parse_args()
    import os

    if args.smoke:
        dims = dict(hidden=128, intermediate=352, heads=4, kv_heads=2, vocab=512, layers=2)
        rank, shard, samples, length = 8, 200_000, 4, 32
    else:
        dims = dict(hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000, layers=args.layers)
        if args.shapes == "llama3-8b":
            dims = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256, layers=args.layers)
        rank, shard, samples, length = args.rank, 1 << 30, args.samples, args.length
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src = Path(tmp) / "model"
        total = make_checkpoint(src, dims, shard)
        config = json.loads((src / "config.json").read_text())
        config["max_position_embeddings"] = max(config.get("max_position_embeddings", 0), length)
        (src / "config.json").write_text(json.dumps(config))
        text = docstrings()
        add_tokenizer(src, text, dims["vocab"])
        chunk = max(1, len(text) // samples)  # characters: ~4 per token, cut to `length` tokens anyway
        texts = [text[k * chunk:(k + 1) * chunk] for k in range(samples)]
        data = Path(tmp) / "calibration.json"
        data.write_text(json.dumps(texts))
        split = Path(tmp) / "split.json"
        env = {**os.environ, "BENCH_CALIBRATION": str(data), "BENCH_LENGTH": str(length), "BENCH_SPLIT": str(split),
               "BENCH_BATCH": str(args.batch), "BENCH_STEPS": str(args.steps), "BENCH_DTYPE": args.dtype}
        results = {}
        for method in args.methods.split(","):
            imports, body = RUNNERS[method]
            out = Path(tmp) / f"out-{method}"
            t0 = time.perf_counter()
            code = HARNESS.format(imports="import sys\n" + imports, body=body)
            result = run_script(method, code, [str(src), str(out), str(rank), "0", json.dumps(PROJECTIONS)], env)
            result["total_s"] = time.perf_counter() - t0
            if split.is_file():  # pissa_rs's time split, or the steps a --steps run took
                result["split_s"] = json.loads(split.read_text())
                split.unlink()
            results[method] = result
            print(method, result, file=sys.stderr)
    print("| method | wall (s) | peak RSS (GiB) |\n|---|---:|---:|")
    for method, r in results.items():
        print(f"| {method} | {r['wall_s']:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} |")
    for ours_name, theirs_name in (("pissa_rs", "peft"), ("pissa_rs_eva", "peft_eva"), ("pissa_rs_lora_ga", "peft_lora_ga")):
        if {ours_name, theirs_name} <= results.keys():
            ours, theirs = results[ours_name], results[theirs_name]
            print(f"{ours_name} / {theirs_name}: wall {ours['wall_s'] / theirs['wall_s']:.2f}x, peak RSS "
                  f"{ours['peak_rss_bytes'] / theirs['peak_rss_bytes']:.2f}x")
    steps = f", EVA's loops ended after step {args.steps}" if args.steps else ""
    print(f"machine: {machine()}; {dims['layers']} layers, {total / 2**30:.2f} GiB, {samples} x {length} tokens, "
          f"layers in {args.dtype}{steps}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "dims": dims, "steps": args.steps, "dtype": args.dtype,
                                         "results": results},
                                        indent=1))


if __name__ == "__main__":
    main()

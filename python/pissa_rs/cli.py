"""The `pissa-rs` command: the Python API's options, spelled for the shell."""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
import traceback
from dataclasses import replace
from pathlib import Path

from ._pissa_rs import Checkpoint, PissaError
from .convert import convert_to_lora
from .decompose import run_decomposition
from .locations import resolve_source
from .logit_check import describe as describe_logit_change
from .engine.outdir import human_bytes
from .options import add_options, options_from_args
from .dry_run import plan_decomposition
from .hub import base_model_of, resolve_model
from .merge import merge_adapter
from .engine.resume import fault_point
from .verify import verify
from .verify_lora import verify_lora
from .model_files import is_model_dir
from .planning.targets import target_choices


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pissa-rs",
        description="Out-of-core PiSSA: split every target weight W of a safetensors checkpoint into a "
        "trainable adapter (its top-r singular triplets) and a frozen residual, in PEFT's format.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print its traceback too (or set PISSA_RS_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    dec = sub.add_parser(
        "decompose",
        help="decompose a checkpoint into a residual model and a PiSSA adapter",
        description="Writes OUT (the residual model, same shards as the input), OUT/pissa_init (the adapter, "
        "PEFT format) and OUT/pissa_report.json. Load with AutoModelForCausalLM.from_pretrained(OUT) then "
        "PeftModel.from_pretrained(model, OUT, subfolder='pissa_init', is_trainable=True).",
    )
    dec.add_argument("path", help="a checkpoint directory (sharded or not), one .safetensors file, or a Hugging Face "
                     "model ID (org/name), fetched through the Hugging Face cache")
    dec.add_argument("--revision", help="with a model ID: branch, tag or commit (default: main)")
    dec.add_argument("--out", "-o", type=Path,
                     help="output directory (default: <name>-pissa-r<rank> beside the input); with several ranks "
                     "it must contain {r}")
    add_options(dec)
    dec.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                     help="run one task per unit on an existing Ray cluster (default address: auto) whose nodes see "
                     "the input and OUT at the same paths; same bytes as a local run (needs pip install "
                     "'pissa-rs[ray]')")
    dec.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    dec.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    dec.add_argument("--dry-run", action="store_true",
                     help="print the plan (targets, ranks, pass-through tensors, bytes, free disk) and exit "
                     "without writing anything; exit 1 if the output would not fit or cannot be created")

    ins = sub.add_parser("inspect", help="list a checkpoint's tensors, dtypes, shapes, files and sizes, its "
                         "architecture, and which modules each target_modules choice picks")
    ins.add_argument("path", help="a checkpoint directory, .safetensors file or Hugging Face model ID")
    ins.add_argument("--revision", help="with a model ID: branch, tag or commit")

    conv = sub.add_parser("to-lora", help="convert a fine-tuned PiSSA adapter to a LoRA of the original model",
                          description="OUT = fine-tuned minus initial adapter, as a rank-2r LoRA that PEFT loads on "
                          "the ORIGINAL model (what PEFT's path_initial_model_for_weight_conversion writes).")
    conv.add_argument("init", type=Path, help="the initial adapter (OUT/pissa_init of the decomposition)")
    conv.add_argument("finetuned", type=Path, help="the fine-tuned adapter (save_pretrained after training)")
    conv.add_argument("out", type=Path, help="where to write the LoRA")
    conv.add_argument("--compact", action="store_true",
                      help="re-factor each module's update to its numerical rank (a smaller LoRA)")
    conv.add_argument("--tol", type=float, default=1e-6,
                      help="with --compact: drop singular values below TOL x |B'| |A'| (default %(default)s)")
    conv.add_argument("--rank", type=int, metavar="R",
                      help="each module's best rank-R approximation, from the factors alone (its numerical rank "
                      "where smaller); the dropped energy per module is printed and written to pissa_conversion.json")
    conv.add_argument("--energy", type=float, metavar="E",
                      help="per module the fewest triplets keeping E (0 < E <= 1) of the update's energy, written as "
                      "rank_pattern / alpha_pattern")
    conv.add_argument("--serve", choices=["vllm"],
                      help="for a server's fixed ranks: re-factored (at most rank 512 for vllm), and the "
                      "--max-lora-rank to start it with printed")
    conv.add_argument("--base-model",
                      help="the original model the LoRA applies to, as its adapter_config.json names it (a path or "
                      "model ID; default: the one INIT's decomposition report records)")
    conv.add_argument("--revision", help="with a model ID for --base-model: branch, tag or commit")
    conv.add_argument("--logit-check", type=int, default=0, metavar="N",
                      help="N random token sequences through the original model with the LoRA and through the "
                      "exact reference (the fine-tuned adapter on the residual model): KL, top-1 agreement, logit "
                      "differences (loads each model whole, one at a time)")

    mrg = sub.add_parser("merge", help="merge an adapter into its residual model (a plain model, out of core)")
    mrg.add_argument("residual", type=Path, help="the residual model (a decomposition's OUT, or a model ID)")
    mrg.add_argument("--revision", help="with a model ID: branch, tag or commit")
    mrg.add_argument("adapter", type=Path, help="the adapter to merge (pissa_init or a fine-tuned one)")
    mrg.add_argument("out", type=Path, help="where to write the merged model")

    ext = sub.add_parser("extract-lora", help="a LoRA of BASE from a fully fine-tuned model: the top-r triplets of "
                         "each target's W_ft - W_base, out of core",
                         description="Writes OUT/pissa_init (a LoRA that PEFT loads onto BASE) and "
                         "OUT/pissa_report.json (per module the share of the difference kept; tensors that differ "
                         "but are not adapted, such as embeddings or norms, listed under 'extract').")
    ext.add_argument("base", type=Path, help="the model the fine-tuning started from (a folder)")
    ext.add_argument("finetuned", type=Path, help="the fully fine-tuned model (a folder, same architecture)")
    ext.add_argument("out", type=Path, help="where to write the LoRA and its report")
    ext.add_argument("--rank", "-r", type=int, default=128, help="the LoRA's rank; with --energy the largest a "
                     "module gets (default %(default)s)")
    ext.add_argument("--energy", type=float, help="per module the fewest triplets that keep this share (0 < E <= 1) "
                     "of ||W_ft - W_base||^2, written as rank_pattern")
    ext.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                     help="run the units as Ray tasks on an existing cluster (as decompose --ray); both models' "
                     "folders must be readable on every node")
    ext.add_argument("--logit-check", type=int, default=0, metavar="N",
                     help="N random token sequences through BASE with the LoRA and through FINETUNED: KL, top-1 "
                     "agreement, logit differences, in the report (loads each model whole, one at a time)")
    ext.add_argument("--save-modules", nargs="?", const="all", metavar="NAMES",
                     help="carry modules whole as PEFT's modules_to_save: comma-separated names or suffixes "
                     "(embed_tokens,lm_head); alone: every module that differs and is not adapted")
    ext.add_argument("--niter", type=int, default=4, help="randomized SVD iterations; 0: exact SVD (default "
                     "%(default)s)")
    ext.add_argument("--target-modules", help="comma-separated, as PEFT's target_modules (default: all-linear)")
    ext.add_argument("--device", help="torch device for the SVDs (default: cuda if available, else cpu)")
    ext.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    ext.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    vl = sub.add_parser("verify-lora", help="check a LoRA from to-lora (exact or truncated) against the adapters it "
                        "came from: no more error than the best LoRA of its rank, and the dropped energy as recorded; "
                        "exit 1 on any mismatch, naming the module")
    vl.add_argument("lora", type=Path, help="the LoRA to-lora wrote")
    vl.add_argument("init", type=Path, help="the initial adapter (OUT/pissa_init of the decomposition)")
    vl.add_argument("finetuned", type=Path, help="the fine-tuned adapter")

    ver = sub.add_parser("verify", help="check a decomposition against its original, out of core; exit 1 on any "
                         "mismatch, naming the tensors")
    ver.add_argument("out", type=Path, help="a decomposition's output directory")
    ver.add_argument("--against", type=Path, required=True, help="the original checkpoint (a path or model ID)")
    ver.add_argument("--revision", help="with a model ID for --against: branch, tag or commit")

    qerr = sub.add_parser("qerror", help="the paper's quantization-error reduction of a residual + adapter pair "
                          "on disk, against quantizing the original (QLoRA), out of core")
    qerr.add_argument("out", type=Path, help="a decomposition's output directory")
    qerr.add_argument("--against", type=Path, required=True, help="the original checkpoint (a path or model ID)")
    qerr.add_argument("--revision", help="with a model ID for --against: branch, tag or commit")
    qerr.add_argument("--quantize", choices=["nf4", "fp4", "int8"],
                      help="the quantization (default: the one OUT's report names, else nf4)")
    qerr.add_argument("--double-quant", action="store_true", help="4-bit double quantization (default: as OUT's "
                      "report says)")
    qerr.add_argument("--json", type=Path, help="also write the per-tensor numbers to this JSON file")
    qerr.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    plot = sub.add_parser("plot", help="PNG plots from OUT/pissa_report.json (needs the 'plot' extra: matplotlib)")
    plot.add_argument("out", help="a decomposition's output directory (or its pissa_report.json)")
    plot.add_argument("--to", type=Path, help="directory for the PNGs (default: OUT/pissa_plots, which merge "
                      "leaves out of a merged model)")
    return parser


def _decompose(args) -> int:
    if args.ray and args.device is None and args.devices is None and not args.dry_run:
        from .engine.ray_run import cluster_device

        args.device = cluster_device(args.ray)  # the nodes' kind, not this machine's
    options = options_from_args(args, on_cluster=bool(args.ray))
    source, out = resolve_source(args.path, args.revision, args.out, options.ranks, headers_only=args.dry_run,
                                 method=options.method)
    if args.dry_run:
        plan = replace(plan_decomposition(source, options, out), input=Path(args.path))
        print(plan.describe())
        return 0 if plan.fits_on_disk and plan.fits_on_device else 1
    results = run_decomposition(source, options, out=out, overwrite=args.overwrite, ray=args.ray,
                                progress=not args.no_progress, origin=base_model_of(args.path, args.revision))
    _completed(what="the output is complete")
    for result in results if isinstance(results, list) else [results]:
        totals = result.report["totals"]
        if result.status != "fresh":
            print(f"{result.out}: " + ("already complete; nothing to do" if result.status == "complete"
                                       else "resumed the interrupted run"))
        print(f"r={result.report['options']['r']}: decomposed {totals['targets']} weights in {totals['seconds']:.1f} s "
              f"(mean energy kept {totals['energy_kept_mean']:.3f})")
        if "error_reduction_mean" in totals:
            loftq = totals.get("loftq_error_reduction_mean")
            print(f"  {result.report['options']['quantize']} error vs QLoRA: {totals['error_reduction_mean']:.1%} "
                  "less (mean over weights)" + (f"; LoftQ: {loftq:.1%} less" if loftq is not None else ""))
        if "config_note" in result.report:
            print(f"  note: {result.report['config_note']}")
        for item in result.report.get("left_out", []):
            print(f"  left out: {item['name']}: {item['why']}")
        if result.report.get("rank_limited"):
            print(f"  rank below r (the weight is smaller): {', '.join(result.report['rank_limited'])}")
        if "quantizer" in result.report:
            print(f"  quantizer: {result.report['quantizer']['reason']}")
        stored = result.report.get("stored_quantized")
        print(f"  residual model: {result.out}" + (f" ({len(stored)} weights stored as "
                                                   f"{result.report['options']['quantize']})" if stored else ""))
        print(f"  adapter:        {result.adapter}")
    return 0


def _inspect(args) -> int:
    source = resolve_model(args.path, args.revision)
    ck = Checkpoint(source)
    width = max((len(t.name) for t in ck.tensors), default=4)
    for t in ck.tensors:
        print(f"{t.name:<{width}}  {t.dtype:<8} {str(list(t.shape)):<18} {human_bytes(t.nbytes):>11}  {Path(t.file).name}")
    total = sum(t.nbytes for t in ck.tensors)
    print(f"{len(ck)} tensors, {human_bytes(total)} in {len(ck.files)} file(s)")
    config = Path(ck.root) / "config.json"
    if not (is_model_dir(source) and config.is_file()):
        print("no config.json: give decompose explicit --target-modules (matched against tensor names)")
        return 0
    choices = target_choices(config.parent)
    print(f"\narchitecture: {choices.architecture}")
    print("target_modules choices:")
    print(f"  {'all-linear':<14} {len(choices.all_linear):>4} modules"
          + (f" (all but the output head {choices.output_head})" if choices.output_head else ""))
    for suffix, names in choices.by_suffix.items():
        print(f"  {suffix:<14} {len(names):>4} module{'s' if len(names) > 1 else ' '}  e.g. {names[0]}")
    return 0


def _to_lora(args) -> int:
    result = convert_to_lora(args.init, args.finetuned, args.out, compact=args.compact, tol=args.tol,
                             rank=args.rank, energy=args.energy, serve=args.serve,
                             base_model=args.base_model, revision=args.revision, logit_check=args.logit_check)
    _completed(what="the LoRA is complete")
    ranks = sorted(set(result.ranks.values()))
    print(f"LoRA for the original model {result.base_model}: {result.out} ({len(result.ranks)} modules, rank "
          f"{ranks[0] if len(ranks) == 1 else f'{ranks[0]}..{ranks[-1]}'})")
    if result.dropped is not None:
        for module, rank in result.ranks.items():
            print(f"  {module}: {rank} ({100 * result.dropped[module]:.3g}% of its update's energy dropped)")
        worst = max(result.dropped, key=result.dropped.get)
        print(f"most dropped: {100 * result.dropped[worst]:.3g}% ({worst})")
    if result.max_lora_rank is not None:
        print(f"serve with: vllm serve {result.base_model} --enable-lora --max-lora-rank {result.max_lora_rank} "
              f"--lora-modules adapter={result.out}")
    if result.logit_change is not None:
        print(describe_logit_change(result.logit_change))
    return 0


def _merge(args) -> int:
    merged = merge_adapter(args.residual, args.adapter, args.out, revision=args.revision)
    _completed(what="the merged model is complete")
    print(f"merged model: {merged}")
    return 0


def _extract_lora(args) -> int:
    from .decompose import extract_lora

    options = {"niter": args.niter, "device": args.device}
    if args.target_modules:
        options["target_modules"] = [m.strip() for m in args.target_modules.split(",") if m.strip()]
    saved = [m.strip() for m in args.save_modules.split(",") if m.strip()] if args.save_modules else None
    result = extract_lora(args.base, args.finetuned, args.out, r=args.rank, energy=args.energy, save_modules=saved,
                          logit_check=args.logit_check, overwrite=args.overwrite, progress=not args.no_progress,
                          ray=args.ray, **options)
    _completed(what="the LoRA is complete")
    tensors = result.report["tensors"]
    kept = [t["energy_kept"] for t in tensors]
    worst = min(tensors, key=lambda t: t["energy_kept"])
    ranks = sorted({t["r"] for t in tensors})
    rank = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    print(f"LoRA of {args.base} ({rank}, {len(tensors)} weights): {result.adapter}")
    print(f"  share of W_ft - W_base kept: mean {sum(kept) / len(kept):.4f}, least {worst['energy_kept']:.4f} "
          f"({worst['module']})")
    if args.energy is not None:
        short = [t["module"] for t in tensors if t["energy_kept"] < args.energy - 1e-6]
        counts = collections.Counter(t["r"] for t in tensors)
        print(f"  ranks chosen for {args.energy:g} of each difference (rank: modules): " + ", ".join(
            f"{k}: {counts[k]}" for k in sorted(counts)) + f"; per module in {result.out / 'pissa_report.json'}")
        if short:
            print(f"  {len(short)} module(s) keep less than {args.energy:g} at rank {args.rank} (raise --rank): "
                  + ", ".join(short))
    extract = result.report["extract"]
    if extract["saved_whole"]:
        print(f"  saved whole (modules_to_save): {', '.join(extract['saved_whole'])}")
    left = [n for n in extract["not_adapted_but_different"]
            if not any(n.startswith(f"{m}.") for m in extract["saved_whole"])]
    if left:
        print(f"  differ but not adapted (not in the LoRA): {', '.join(left)}")
    if "logit_change" in result.report:
        print(f"  {describe_logit_change(result.report['logit_change'])}")
    return 0


def _verify_lora(args) -> int:
    report = verify_lora(args.lora, args.init, args.finetuned)
    for problem in report.problems:
        print(f"MISMATCH {problem}")
    print(f"{'OK' if report.ok else 'FAILED'}: {report.checked_targets} modules checked against the exact update")
    return 0 if report.ok else 1


def _verify(args) -> int:
    report = verify(args.out, args.against, revision=args.revision)
    for problem in report.problems:
        print(f"MISMATCH {problem}")
    print(f"{'ok' if report.ok else 'FAILED'}: {report.checked_targets} targets reconstruct within rounding, "
          f"{report.checked_passthrough} pass-through tensors checked, {len(report.problems)} problem(s)")
    return 0 if report.ok else 1


def _qerror(args) -> int:
    from .qerror import measure_quantization_error

    result = measure_quantization_error(args.out, args.against, quantize=args.quantize,
                                        double_quant=args.double_quant or None, revision=args.revision,
                                        progress=not args.no_progress)
    width = max(len(t["tensor"]) for t in result["tensors"])
    for t in result["tensors"]:
        print(f"{t['tensor']:<{width}}  {t['error_reduction']:7.2%}  (||error||_* {t['quant_error']:.4g}, "
              f"QLoRA {t['qlora_error']:.4g})")
    print(f"{result['quantize']}: mean error reduction {result['error_reduction_mean']:.2%} over "
          f"{len(result['tensors'])} weights")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


def _plot(args) -> int:
    from .plots import plot_report

    for path in plot_report(args.out, args.to):
        print(path)
    return 0


def _completed(what: str) -> None:
    """Past this point the files are complete: a Ctrl-C now (while the summary prints or
    the interpreter exits) loses nothing, and is said so instead of exiting 130."""

    def say(signum, frame):
        print(f"pissa-rs: Ctrl-C after the work finished: {what}, nothing was lost", file=sys.stderr)

    signal.signal(signal.SIGINT, say)
    fault_point("completed")


def main(argv: list[str] | None = None, *, keep_signal_handlers: bool = False) -> int:
    """The command line; `argv` None: sys.argv. The SIGINT handler a finished command
    installs is put back on return unless `keep_signal_handlers` (the console script:
    the interpreter's exit is after the work too)."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("PISSA_RS_DEBUG", "") not in ("", "0")
    previous = signal.getsignal(signal.SIGINT)
    try:
        return {"decompose": _decompose, "inspect": _inspect, "to-lora": _to_lora, "merge": _merge,
                "verify": _verify, "verify-lora": _verify_lora, "extract-lora": _extract_lora, "qerror": _qerror, "plot": _plot}[args.command](args)
    except (PissaError, ValueError, OSError, ImportError) as err:
        if debug:
            traceback.print_exc()
        print(f"pissa-rs: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("pissa-rs: interrupted; no incomplete file is under a final name. Run the same command again to "
              "resume where it stopped.", file=sys.stderr)
        return 130
    finally:
        if not keep_signal_handlers:
            signal.signal(signal.SIGINT, previous)


def entry() -> None:
    """The `pissa-rs` console script."""
    code = main(keep_signal_handlers=True)
    exit_now(code)


def exit_now(code: int) -> None:
    """Exit with `code` as the interpreter would, less its teardown: freeing every module's
    objects (torch's above all) took ~0.5 s after the work was written. What an exit must still
    do is done first: non-daemon threads finish, the exit handlers run (Ray's shutdown,
    multiprocessing's children, weakref finalizers such as temporary folders'), the standard
    streams are flushed."""
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: the interpreter would also say nothing
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()

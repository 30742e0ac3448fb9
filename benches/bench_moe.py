"""Benchmark: an MoE checkpoint (Qwen3-30B-A3B layer shapes) against a dense one of about the same bytes.

    python benches/bench_moe.py [--layers 1] [--rank 64] [--niter 2] [--workdir DIR] [--smoke]

Builds, with random bf16 weights, a Qwen3MoeForCausalLM checkpoint as transformers saves
it (hidden 2048, 32 query / 4 key-value heads of 128, 128 experts of 768 per layer, each
expert's gate_proj / up_proj / down_proj its own tensor; a small vocabulary), and a
LlamaForCausalLM of the same hidden size whose MLP (intermediate 98304) has the bytes of
the 128 experts. Both are decomposed with target_modules="all-linear": on the MoE that is
PEFT's own expansion, attention + router + every expert (gate_up fused per expert at 2r,
down at r); on the dense one attention + MLP. Reports wall time (after imports), peak RSS
and throughput of each, in its own process, on this machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_decompose import HARNESS, machine, run_script, write_random_shards  # noqa: E402

BODY = ("import torch, pissa_rs", """
pissa_rs.decompose_checkpoint(SRC, r=R, niter=NITER, out=OUT, progress=False)
""")


def layer_tensors(i: int, hidden: int, heads: int, kv_heads: int, head_dim: int) -> dict[str, list[int]]:
    """A decoder layer's norms and attention projections."""
    p = f"model.layers.{i}."
    return {p + "input_layernorm.weight": [hidden], p + "post_attention_layernorm.weight": [hidden],
            p + "self_attn.q_proj.weight": [heads * head_dim, hidden],
            p + "self_attn.k_proj.weight": [kv_heads * head_dim, hidden],
            p + "self_attn.v_proj.weight": [kv_heads * head_dim, hidden],
            p + "self_attn.o_proj.weight": [hidden, heads * head_dim]}


def moe_tensors(layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, experts: int,
                expert_dim: int, vocab: int) -> dict[str, list[int]]:
    """Qwen3MoeForCausalLM's tensors as save_pretrained writes them (per-expert, v4 names)."""
    t = {"model.embed_tokens.weight": [vocab, hidden], "model.norm.weight": [hidden], "lm_head.weight": [vocab, hidden]}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update(layer_tensors(i, hidden, heads, kv_heads, head_dim))
        t.update({p + "self_attn.q_norm.weight": [head_dim], p + "self_attn.k_norm.weight": [head_dim],
                  p + "mlp.gate.weight": [experts, hidden]})
        for e in range(experts):
            t.update({f"{p}mlp.experts.{e}.gate_proj.weight": [expert_dim, hidden],
                      f"{p}mlp.experts.{e}.up_proj.weight": [expert_dim, hidden],
                      f"{p}mlp.experts.{e}.down_proj.weight": [hidden, expert_dim]})
    return t


def dense_tensors(layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int,
                  vocab: int) -> dict[str, list[int]]:
    t = {"model.embed_tokens.weight": [vocab, hidden], "model.norm.weight": [hidden], "lm_head.weight": [vocab, hidden]}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update(layer_tensors(i, hidden, heads, kv_heads, head_dim))
        t.update({p + "mlp.gate_proj.weight": [intermediate, hidden], p + "mlp.up_proj.weight": [intermediate, hidden],
                  p + "mlp.down_proj.weight": [hidden, intermediate]})
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, help="where to build the checkpoints (default: a temporary directory)")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--niter", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script, not the speed")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    from transformers import LlamaConfig, Qwen3MoeConfig

    hidden, heads, kv, head_dim, experts, expert_dim, vocab = 2048, 32, 4, 128, 128, 768, 4096
    if args.smoke:
        hidden, heads, kv, head_dim, experts, expert_dim, vocab = 64, 4, 2, 16, 4, 32, 128
    intermediate = experts * expert_dim  # the dense MLP has the experts' bytes
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        results = {"machine": machine(), "rank": args.rank, "niter": args.niter, "layers": args.layers}
        for kind in ("moe", "dense"):
            src = Path(tmp) / kind
            src.mkdir()
            if kind == "moe":
                Qwen3MoeConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                               num_experts=experts, num_experts_per_tok=8, moe_intermediate_size=expert_dim,
                               intermediate_size=expert_dim * 8, num_hidden_layers=args.layers, vocab_size=vocab,
                               tie_word_embeddings=False, dtype="bfloat16").save_pretrained(src)
                tensors = moe_tensors(args.layers, hidden, heads, kv, head_dim, experts, expert_dim, vocab)
            else:
                LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                            intermediate_size=intermediate, num_hidden_layers=args.layers, vocab_size=vocab,
                            tie_word_embeddings=False, dtype="bfloat16").save_pretrained(src)
                tensors = dense_tensors(args.layers, hidden, heads, kv, head_dim, intermediate, vocab)
            nbytes = write_random_shards(src, tensors, 2 << 30)
            result = run_script(kind, HARNESS.format(imports=BODY[0], body=BODY[1]),
                                [str(src), str(Path(tmp) / f"{kind}-out"), str(args.rank), str(args.niter), "[]"])
            report = json.loads((Path(tmp) / f"{kind}-out" / "pissa_report.json").read_text())
            result.update(input_bytes=nbytes, matrices=len(report["tensors"]),
                          throughput_mb_s=nbytes / result["wall_s"] / 1e6)
            results[kind] = result
            print(f"{kind:5}: {nbytes / 2**30:.2f} GiB, {result['matrices']} matrices decomposed, "
                  f"{result['wall_s']:.1f} s ({result['throughput_mb_s']:.1f} MB/s), "
                  f"peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
        print(results["machine"])
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

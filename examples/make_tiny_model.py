"""Make a small random-weight model checkpoint to try pissa_rs on (no download needed).

    python examples/make_tiny_model.py OUT [--arch llama|gpt2] [--layers 2] [--dtype float32] [--shard-size 200KB]

The model is built by transformers from a config, with random weights, and saved
as sharded safetensors with its index, like a real Hugging Face checkpoint, with a
byte-level tokenizer (token id = byte value, built offline) so that trainers that
need one (TRL's SFTTrainer) take it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig


def tiny_config(arch: str = "llama", layers: int = 2, hidden: int = 64, intermediate: int = 160):
    if arch == "llama":
        return LlamaConfig(
            vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        )
    if arch == "gpt2":
        return GPT2Config(vocab_size=256, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128,
                          bos_token_id=0, eos_token_id=0)
    raise ValueError(f"unknown arch {arch!r}: llama or gpt2")


def spectrum_matrix(rows: int, cols: int, decay: float, scale: float = 1.0,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """A rows x cols matrix with random singular vectors and singular values
    falling as k**-decay, like trained weights (random init has a flat spectrum);
    its entries have standard deviation `scale`."""
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=generator))
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -decay
    m = (u * s) @ v.T
    return m * (scale / m.std())


def byte_tokenizer():
    """A tokenizer for the 256-token vocabulary: one token per byte (GPT-2's byte-level
    alphabet, no merges), token id = byte value; byte 0 doubles as EOS and padding.
    Built from the `tokenizers` package alone: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # GPT-2's byte -> character table, in byte order: printable bytes map to themselves,
    # the others to 256 + k in order of appearance.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    assert set(chars.values()) == set(alphabet)
    tokenizer = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=chars[0], pad_token=chars[0])


def save_tiny_model(out: str | Path, arch: str = "llama", layers: int = 2, dtype: str = "float32",
                    shard_size: str = "200KB", seed: int = 0, hidden: int = 64, intermediate: int = 160,
                    decay: float | None = None, tokenizer: bool = True) -> Path:
    """Save a random `arch` model with `layers` layers to `out` (with the byte-level
    tokenizer unless `tokenizer=False`); returns `out`. With `decay`, every 2-D weight
    of the layers gets a power-law spectrum (singular values ~ k**-decay) instead of
    random init's flat one."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers, hidden, intermediate))
    # Random init leaves some weights at exact constants (norms at 1); spread them so
    # that pass-through copies are really tested on varied bytes.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if decay is not None and p.dim() == 2 and (".layers." in name or ".h." in name):
                p.copy_(spectrum_matrix(*p.shape, decay=decay, scale=0.05))
            else:
                p.add_(torch.randn_like(p) * 0.02)
    model = model.to(getattr(torch, dtype))
    out = Path(out)
    model.save_pretrained(out, max_shard_size=shard_size)
    if tokenizer:
        byte_tokenizer().save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--arch", default="llama", choices=["llama", "gpt2"])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--shard-size", default="200KB")
    ap.add_argument("--decay", type=float, help="power-law spectrum k**-DECAY for the layers' weights")
    args = ap.parse_args()
    out = save_tiny_model(args.out, args.arch, args.layers, args.dtype, args.shard_size, decay=args.decay)
    print(f"saved a random {args.arch} with {args.layers} layers to {out}")


if __name__ == "__main__":
    main()

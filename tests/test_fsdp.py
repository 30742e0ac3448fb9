"""Sharded training of a decomposition with FSDP2 (examples/fsdp2_train.py, run as the docs say:
torchrun, the gloo backend, on this CPU): two processes take the steps one process takes, loss
for loss within float rounding, for the float residual and for QPiSSA's 4-bit one; the adapter
rank 0 gathers and saves opens by folder onto the residual, and converts to a LoRA of the
original model that gives the fine-tuned logits."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from make_tiny_model import save_tiny_model

import pissa_rs

SCRIPT = Path(__file__).parent.parent / "examples" / "fsdp2_train.py"


@pytest.fixture(scope="module")
def decomposition(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    base = save_tiny_model(root / "base", "llama", layers=2)
    return base, pissa_rs.decompose_checkpoint(base, r=4, out=root / "pissa", progress=False).out


def torchrun(out: Path, run: Path, processes: int, *extra: str) -> list[float]:
    """The docs' command; the loss of each step, as rank 0 prints it."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), str(SCRIPT), str(out), str(run), *extra],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"adapter tensors to {run / 'adapter'}" in done.stdout
    sharded = re.search(r"^sharded (\d+) of (\d+) parameters over (\d+) rank", done.stdout, flags=re.M)
    assert sharded and sharded[1] == sharded[2] != "0" and sharded[3] == str(processes), done.stdout[-500:]
    return [float(x) for x in re.findall(r"^step \d+ loss (\S+)$", done.stdout, flags=re.M)]


def test_two_processes_take_the_steps_of_one_and_the_adapter_converts(decomposition, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    base, out = decomposition
    one = torchrun(out, tmp_path / "one", 1, "--steps", "4")
    two = torchrun(out, tmp_path / "two", 2, "--steps", "4")
    assert len(one) == len(two) == 4 and two[-1] < two[0] - 1e-2  # it trained
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-6, atol=0)

    probe = torch.tensor([list(b"a sharded run takes the steps")])
    with torch.no_grad():
        tuned = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "two" / "adapter").eval()
        alone = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "one" / "adapter").eval()
        logits = tuned(probe).logits
        torch.testing.assert_close(logits, alone(probe).logits, rtol=0, atol=1e-4)
        assert (logits - AutoModelForCausalLM.from_pretrained(base)(probe).logits).abs().max() > 1e-3  # moved
        pissa_rs.convert_to_lora(out / "pissa_init", tmp_path / "two" / "adapter", tmp_path / "lora")
        lora = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "lora").eval()
        assert Path(lora.peft_config["default"].base_model_name_or_path).resolve() == Path(base).resolve()
        torch.testing.assert_close(lora(probe).logits, logits, rtol=0, atol=1e-4)


def test_qpissa_4bit_residual_trains_sharded_as_in_one_process(decomposition, tmp_path):
    """bitsandbytes' NF4 weights (its CPU path) under fully_shard: the same losses."""
    _, out = decomposition
    one = torchrun(out, tmp_path / "one", 1, "--steps", "3", "--quantize", "nf4")
    two = torchrun(out, tmp_path / "two", 2, "--steps", "3", "--quantize", "nf4")
    assert len(two) == 3
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-6, atol=0)
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from fsdp2_train import batches
    finally:
        sys.path.remove(str(SCRIPT.parent))
    model = pissa_rs.load_for_training(out, compute_dtype=torch.float32)
    first = batches(model.config.vocab_size, 1)[0]
    with torch.no_grad():
        float_loss = model(input_ids=first, labels=first).loss.item()
    assert abs(float_loss - one[0]) > 1e-5  # the 4-bit residual was in use: its first loss is another

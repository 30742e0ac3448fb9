"""load_for_training and the end-to-end fine-tuning example."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from make_tiny_model import save_tiny_model

import pissa_rs

EXAMPLE = Path(__file__).parent.parent / "examples" / "finetune_tiny.py"


def test_load_for_training_gives_a_trainable_model_with_float32_adapters(tmp_path):
    src = save_tiny_model(tmp_path / "m", "llama", layers=1, dtype="bfloat16")
    res = pissa_rs.decompose_checkpoint(src, r=4, out=tmp_path / "o", progress=False)
    model = pissa_rs.load_for_training(res.out)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    loss = model(input_ids=torch.randint(0, 256, (2, 8)), labels=torch.randint(0, 256, (2, 8))).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in trainable.values())
    with pytest.raises(ValueError, match="quantize must be one of"):
        pissa_rs.load_for_training(res.out, quantize="nf3")


def test_load_for_training_refuses_an_adapter_of_another_model(tmp_path):
    a = pissa_rs.decompose_checkpoint(save_tiny_model(tmp_path / "a", "llama", layers=1), r=4, out=tmp_path / "oa",
                                      progress=False)
    wide = save_tiny_model(tmp_path / "b", "llama", layers=1, hidden=96)
    b = pissa_rs.decompose_checkpoint(wide, r=4, out=tmp_path / "ob", progress=False)
    (b.adapter / "adapter_model.safetensors").write_bytes((a.adapter / "adapter_model.safetensors").read_bytes())
    with pytest.raises(pissa_rs.AdapterMismatchError,
                       match=r"ob/pissa_init: module 'base_model\.model\.model\.layers\.0\.[a-z_.]+': adapter B\[\d+, 4\] "
                       r"A\[4, \d+\] does not fit weight .* do not belong together"):
        pissa_rs.load_for_training(b.out)
    # Right shapes, but a config whose rank is not the adapter's: refused too, naming the module.
    config_path = a.adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["r"] = 8
    config_path.write_text(json.dumps(config))
    with pytest.raises(pissa_rs.AdapterMismatchError, match=r"module '.*' \(model\.layers\.0\..*\.weight\): adapter rank 4 "
                       r"but adapter_config says r=8"):
        pissa_rs.load_for_training(a.out)


def test_the_finetuning_example_runs_and_the_conversion_is_exact(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--workdir", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=EXAMPLE.parent)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "training loss:" in proc.stdout and "max |logit difference|" in proc.stdout
    losses = [float(x) for x in proc.stdout.split("training loss:")[1].splitlines()[0].split("->")]
    assert losses[-1] < losses[0], losses  # real optimizer steps happened


def test_save_as_lora_writes_a_lora_of_the_original_at_every_save_and_at_the_end(tmp_path):
    """SaveAsLoRA under transformers' Trainer: each checkpoint's lora_of_original, loaded by
    folder onto the ORIGINAL model, gives that checkpoint's fine-tuned logits (the residual
    plus the checkpoint's adapter); the one at the end gives the final model's. Bad options
    are named when the callback is made, not at the first save."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from pissa_rs.training import SaveAsLoRA

    base = save_tiny_model(tmp_path / "base", "llama", layers=2)
    res = pissa_rs.decompose_checkpoint(base, r=4, out=tmp_path / "pissa", progress=False)
    with pytest.raises(ValueError, match="energy must be in"):
        SaveAsLoRA(res.out, energy=1.5)
    with pytest.raises(FileNotFoundError, match="pissa_init"):
        SaveAsLoRA(base)
    ids = torch.tensor(list(b"PiSSA trains the principal singular vectors. " * 8), dtype=torch.long)
    data = [{"input_ids": ids[i:i + 24], "labels": ids[i:i + 24]} for i in range(0, 24 * 12, 24)]
    model = pissa_rs.load_for_training(res.out)
    callback = SaveAsLoRA(res.out)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                             learning_rate=5e-3, report_to=[], use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    run = tmp_path / "run"
    assert callback.written == [run / "checkpoint-2" / "lora_of_original", run / "checkpoint-4" / "lora_of_original",
                                run / "lora_of_original"]
    probe = ids[None, :20]
    with torch.no_grad():
        final = model.eval()(probe).logits
        for checkpoint in ("checkpoint-2", "checkpoint-4"):
            tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(res.out), run / checkpoint).eval()
            lora = AutoPeftModelForCausalLM.from_pretrained(run / checkpoint / "lora_of_original").eval()
            assert Path(lora.peft_config["default"].base_model_name_or_path).resolve() == Path(base).resolve()
            torch.testing.assert_close(lora(probe).logits, tuned(probe).logits, atol=1e-4, rtol=0)
        at_end = AutoPeftModelForCausalLM.from_pretrained(run / "lora_of_original").eval()
        torch.testing.assert_close(at_end(probe).logits, final, atol=1e-4, rtol=0)
        before = AutoPeftModelForCausalLM.from_pretrained(run / "checkpoint-2" / "lora_of_original").eval()
        assert (before(probe).logits - final).abs().max() > 1e-3  # the steps moved it: the check can fail

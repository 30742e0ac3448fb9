"""Preference training on a decomposition (preference.py): the reference TRL's DPO and GRPO
(beta > 0) compare the policy with is the ORIGINAL model, per method in the registry, when the
policy comes from `load_for_training` and no ref_model is given; the paths whose reference is
the residual W_res (a peft_config on the residual, the residual as ref_model, a trained adapter
copied as "ref") are named by `check_reference`. Log-probabilities are checked in float32
(bf16=False: TRL's default bf16 autocast moves them by ~1e-3 on a CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from helpers import calibration_texts, save_tokenizer

import pissa_rs
from pissa_rs.methods import get_method, method_names
from pissa_rs.training import ReferenceWarning, check_reference

TEXTS = calibration_texts(24)
R = 4
# float32 log-probabilities of ~30 tokens, W_res + B0 A0 against W: rounding only
RTOL, ATOL = 1e-5, 1e-4
# every method that initializes an adapter for training (extract makes a LoRA of another model)
TRAINED = [name for name in method_names() if not get_method(name).reads_base]


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    path = tmp_path_factory.mktemp("pref") / "m"
    tokenizer = save_tokenizer(path, TEXTS)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128)).save_pretrained(path)
    return path


def tokenizer_of(path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def decompose(path, out, method):
    calibrated = get_method(method).calibration is not None
    extra = dict(calibration=TEXTS, calibration_samples=8, calibration_length=32) if calibrated else {}
    return pissa_rs.decompose_checkpoint(path, r=R, method=method, out=out, progress=False, **extra)


def pairs():
    import datasets

    return datasets.Dataset.from_list([{"prompt": t[:40], "chosen": t[40:70], "rejected": t[70:100]}
                                       for t in TEXTS[:4]])


def dpo(model, path, workdir, ref_model=None, peft_config=None, precompute=True, steps=1):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(workdir), bf16=False, use_cpu=True, per_device_train_batch_size=2, max_steps=steps,
                     report_to=[], precompute_ref_log_probs=precompute, beta=0.1, disable_tqdm=True,
                     learning_rate=1e-2, save_strategy="no")
    return DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=pairs(),
                      processing_class=tokenizer_of(path), peft_config=peft_config)


def logps(model, prompt, completion) -> torch.Tensor:
    """Per-token log-probabilities of `completion` after `prompt`, by hand."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
    per_token = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
    return per_token[len(prompt) - 1:]


def dpo_reference_gap(trainer, model) -> float:
    """The largest relative gap between the reference log-probs TRL precomputed and `model`'s."""
    gaps = []
    for row in trainer.train_dataset:
        for side in ("chosen", "rejected"):
            mine = logps(model, row["prompt_ids"], row[f"{side}_ids"]).sum().item()
            gaps.append(abs(row[f"ref_{side}_logps"] - mine) / max(abs(mine), 1.0))
    return max(gaps)


@pytest.mark.parametrize("method", TRAINED)
def test_dpo_and_grpo_compare_with_the_original_model(original, tmp_path, method):
    from trl import GRPOConfig, GRPOTrainer

    res = decompose(original, tmp_path / "o", method)
    base = transformers.AutoModelForCausalLM.from_pretrained(original).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReferenceWarning)
        trainer = dpo(pissa_rs.load_for_training(res.out), original, tmp_path / "dpo")
        assert check_reference(trainer).problem is None
    assert dpo_reference_gap(trainer, base) <= RTOL

    import datasets

    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), bf16=False, use_cpu=True, per_device_train_batch_size=2,
                      num_generations=2, max_completion_length=6, max_steps=1, beta=0.1, report_to=[],
                      disable_tqdm=True, save_strategy="no")
    grpo = GRPOTrainer(model=pissa_rs.load_for_training(res.out), args=args,
                       reward_funcs=lambda completions, **_: [float(len(c)) for c in completions],
                       train_dataset=datasets.Dataset.from_list([{"prompt": t[:40]} for t in TEXTS[:4]]),
                       processing_class=tokenizer_of(original))
    assert check_reference(grpo).problem is None
    seen = []
    real = grpo._generate_and_score_completions
    grpo._generate_and_score_completions = lambda inputs: seen.append(real(inputs)) or seen[-1]
    grpo.train()
    assert seen and all(out["ref_per_token_logps"] is not None for out in seen)
    compared = 0
    for out in seen:
        for row in range(out["completion_ids"].shape[0]):
            prompt = out["prompt_ids"][row][out["prompt_mask"][row].bool()].tolist()
            kept = out["completion_mask"][row].bool()
            completion = out["completion_ids"][row][kept].tolist()
            if not completion:
                continue
            mine = logps(base, prompt, completion)
            torch.testing.assert_close(out["ref_per_token_logps"][row][kept].float(), mine, rtol=RTOL, atol=ATOL)
            compared += 1
    assert compared


def test_the_paths_whose_reference_is_the_residual_are_named(original, tmp_path):
    """Each is a real difference (the reference log-probs move), and each is warned about: a
    peft_config handed to TRL with the residual as the model (adapters disabled = W_res), the
    residual as ref_model, a trained checkpoint's adapter copied in as "ref". GRPO's default
    beta = 0 has no reference (said, not warned); MiCA, whose base is the original, is right
    with a peft_config too."""
    from peft import LoraConfig, PeftModel

    res = decompose(original, tmp_path / "o", "pissa")
    base = transformers.AutoModelForCausalLM.from_pretrained(original).eval()
    residual = lambda: transformers.AutoModelForCausalLM.from_pretrained(res.out)  # noqa: E731

    config = LoraConfig(r=R, lora_alpha=R, target_modules="all-linear", task_type="CAUSAL_LM")
    wrong = dpo(residual(), original, tmp_path / "a", peft_config=config)
    with pytest.warns(ReferenceWarning, match=r"the reference is the residual of .*/o \(W - s\*B0@A0\)"):
        assert check_reference(wrong).problem
    assert dpo_reference_gap(wrong, base) > 100 * RTOL  # what the warning is about: W_res is not W

    with pytest.warns(ReferenceWarning, match=r"ref_model is the residual of .*/o"):
        check_reference(dpo(pissa_rs.load_for_training(res.out), original, tmp_path / "b", ref_model=residual()))

    trained = dpo(pissa_rs.load_for_training(res.out), original, tmp_path / "c", precompute=False, steps=2)
    trained.train()
    trained.model.save_pretrained(tmp_path / "checkpoint")
    again = PeftModel.from_pretrained(residual(), tmp_path / "checkpoint", is_trainable=True)
    with pytest.warns(ReferenceWarning, match=r"'ref' adapter is not the initial adapter of .*/o: .*lora_[AB]\.ref"):
        check_reference(dpo(again, original, tmp_path / "d", precompute=False))

    from trl import GRPOConfig, GRPOTrainer

    import datasets

    none = GRPOTrainer(model=pissa_rs.load_for_training(res.out), reward_funcs=lambda completions, **_: [0.0],
                       args=GRPOConfig(output_dir=str(tmp_path / "g"), bf16=False, use_cpu=True, report_to=[],
                                       per_device_train_batch_size=2, num_generations=2),
                       train_dataset=datasets.Dataset.from_list([{"prompt": "a"}] * 2),
                       processing_class=tokenizer_of(original))
    assert check_reference(none).what.startswith("none: beta is 0")

    mica = decompose(original, tmp_path / "mica", "mica")
    model_of = pissa_rs.locations.model_of_output(mica.out)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReferenceWarning)
        right = dpo(transformers.AutoModelForCausalLM.from_pretrained(model_of), original, tmp_path / "e",
                    peft_config=config)
        assert check_reference(right).what == "the base model with the adapters disabled"
    assert dpo_reference_gap(right, base) <= RTOL


def test_a_few_dpo_steps_keep_the_reference_the_original_model(original, tmp_path):
    """Training moves the policy, not the reference: after DPO steps (reference computed each
    step, not precomputed) the "ref" adapter is still the initial one and gives the original
    model's log-probs, while the policy's have moved."""
    res = decompose(original, tmp_path / "o", "pissa")
    trainer = dpo(pissa_rs.load_for_training(res.out), original, tmp_path / "run", precompute=False, steps=3)
    loss = trainer.train().training_loss
    assert check_reference(trainer).problem is None
    base = transformers.AutoModelForCausalLM.from_pretrained(original).eval()
    batch = next(iter(trainer.get_train_dataloader()))
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    row = trainer.train_dataset[0]
    # the dataloader shuffles: compare the batch's sums with the by-hand sums of every row
    by_hand = [logps(base, r["prompt_ids"], r["chosen_ids"]).sum().item() for r in trainer.train_dataset]
    assert all(min(abs(c - h) for h in by_hand) <= ATOL + RTOL * abs(c) for c in chosen.tolist()), (chosen, by_hand)
    policy = trainer.model.eval()
    ids = torch.tensor([row["prompt_ids"] + row["chosen_ids"]])
    with torch.no_grad():
        assert (policy(ids).logits - base(ids).logits).abs().max() > 1e-3  # the steps moved the policy
    assert rejected.shape == chosen.shape and 0 < loss < 10

"""The front door holds: the README's quickstart runs as written (and equals the docs'),
the README stays short, the stubs match the compiled module, the declared dependency
floors are the ones checked at run time, and an old library is named in one line."""

from __future__ import annotations

import ast
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pissa_rs
from pissa_rs import _pissa_rs
from pissa_rs import requirements

ROOT = Path(__file__).resolve().parent.parent


def quickstart_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, code) of each fenced block between the quickstart markers."""
    text = path.read_text()
    body = text.split("<!-- quickstart -->", 1)[1].split("<!-- /quickstart -->", 1)[0]
    return re.findall(r"```(bash|python)\n(.*?)```", body, flags=re.S)


def test_the_readme_and_the_docs_show_the_same_quickstart():
    readme = quickstart_blocks(ROOT / "README.md")
    assert len(readme) >= 4 and readme == quickstart_blocks(ROOT / "docs" / "quickstart.md")


def test_the_quickstart_runs_as_written_and_the_converted_lora_is_the_fine_tuned_model(tmp_path, monkeypatch):
    """decompose -> PEFT load -> TRL's SFTTrainer -> to-lora -> AutoPeftModel, from the files alone."""
    pytest.importorskip("trl")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    namespace: dict = {}
    for language, code in quickstart_blocks(ROOT / "README.md"):
        if language == "bash":
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], env=env, capture_output=True, text=True,
                                  timeout=600)
            assert proc.returncode == 0, proc.stdout + proc.stderr
        else:
            exec(compile(code, "README.md quickstart", "exec"), namespace)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # The fine-tuned model as saved (TRL casts the in-memory base to bf16 for training):
    # the residual + the fine-tuned adapter, from the files alone.
    residual = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-llama-pissa")
    model = PeftModel.from_pretrained(residual, tmp_path / "pissa-ft").eval()
    lora = namespace["lora"].eval()
    ids = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tuned, converted = model(ids).logits, lora(ids).logits
        on_residual_alone = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-llama-pissa")(ids).logits
    assert (on_residual_alone - tuned).abs().max() > 0.1  # the adapter matters: the comparison can fail
    from safetensors.torch import load_file

    initial = load_file(tmp_path / "tiny-llama-pissa" / "pissa_init" / "adapter_model.safetensors")
    trained = load_file(tmp_path / "pissa-ft" / "adapter_model.safetensors")
    assert initial.keys() == trained.keys() and any(not torch.equal(initial[k], trained[k]) for k in initial)
    torch.testing.assert_close(converted, tuned, atol=1e-4, rtol=0)
    with torch.no_grad():  # SaveAsLoRA's LoRA at the end of training: the same fine-tuned model
        torch.testing.assert_close(namespace["at_end"].eval()(ids).logits, tuned, atol=1e-4, rtol=0)
    assert [p.as_posix() for p in namespace["save_lora"].written] == [  # (relative: the quickstart's own paths)
        "sft/checkpoint-4/lora_of_original", "sft/checkpoint-8/lora_of_original", "sft/lora_of_original"]
    assert (tmp_path / "tiny-llama-pissa" / "tokenizer.json").is_file()


def test_the_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 8192
    first_block = re.search(r"```bash\n(.*?)```", readme, flags=re.S).group(1)
    assert "make_tiny_model.py" in first_block and "pissa-rs decompose" in first_block  # the set-up comes first
    assert "python -m pytest -q" in readme and "python -m pytest -q" in (ROOT / ".ci" / "run").read_text()
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), link


def test_every_docs_page_is_in_the_nav_and_nothing_cites_a_missing_design_file():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f": {page.name}" in nav, page.name
    for path in [*ROOT.glob("python/pissa_rs/*.py"), *ROOT.glob("docs/*.md"), ROOT / "README.md"]:
        assert "DESIGN.md" not in path.read_text(), path


def _stub_tree():
    tree = ast.parse((ROOT / "python" / "pissa_rs" / "_pissa_rs.pyi").read_text())
    classes, functions, bases = {}, {}, {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            members = {}
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    members[item.name] = [a.arg for a in [*item.args.posonlyargs, *item.args.args,
                                                          *item.args.kwonlyargs] if a.arg != "self"]
                elif isinstance(item, ast.AnnAssign):
                    members[item.target.id] = None
            classes[node.name] = members
            bases[node.name] = [b.id for b in node.bases if isinstance(b, ast.Name)]
        elif isinstance(node, ast.FunctionDef):
            functions[node.name] = [a.arg for a in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]]
    return classes, functions, bases


def _parameters(obj) -> list[str] | None:
    try:
        return [p for p in inspect.signature(obj).parameters if p != "self"]
    except (TypeError, ValueError):
        return None  # no text signature: names cannot be compared


def test_the_stubs_match_the_compiled_module():
    classes, functions, bases = _stub_tree()
    compiled = {n: v for n, v in vars(_pissa_rs).items() if not n.startswith("_")}
    assert set(compiled) == set(classes) | set(functions), set(compiled) ^ (set(classes) | set(functions))
    for name, members in classes.items():
        cls = compiled[name]
        for base in bases[name]:  # the exception hierarchy (Buffer is a protocol, not a base)
            if base != "Buffer":
                assert (compiled.get(base) or {"Exception": Exception}[base]) in cls.__mro__, (name, base)
        if issubclass(cls, BaseException):
            continue  # their attributes (path, tensor, errno) are set per instance, in Rust
        public = {m for m in dir(cls) if not m.startswith("_") and not hasattr(Exception, m)}
        stubbed = {m for m in members if not m.startswith("_")}
        assert public == stubbed, (name, public ^ stubbed)
        for member, params in members.items():
            if params is None or member.startswith("__") and member != "__init__":
                continue
            target = cls if member == "__init__" else getattr(cls, member)
            actual = _parameters(target)
            if actual is not None:
                assert actual == params, (name, member, actual, params)
    for name, params in functions.items():
        actual = _parameters(compiled[name])
        assert actual is None or actual == params, (name, actual, params)


def test_version_is_the_installed_distributions():
    from importlib.metadata import version

    assert pissa_rs.__version__ == version("pissa-rs")
    assert re.search(rf'^version = "{re.escape(pissa_rs.__version__)}"', (ROOT / "pyproject.toml").read_text(), re.M)


def test_declared_floors_are_the_ones_checked_at_run_time():
    text = (ROOT / "pyproject.toml").read_text()
    block = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    declared = dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)(?:,<[0-9.]+)?"', block))
    assert declared == requirements.FLOORS
    assert dict(re.findall(r'"([A-Za-z0-9_.-]+)>=[0-9.]+,<([0-9.]+)"', block)) == requirements.CEILINGS
    assert "safetensors" not in declared  # not imported at run time: transformers brings it


def test_a_library_past_its_tested_ceiling_is_warned_about_with_the_command(monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.23.0" if name == "peft" else real(name))
    requirements.require_versions.cache_clear()
    try:
        with pytest.warns(UserWarning, match=re.escape('not yet tested with peft 0.23.0 (>= 0.23): '
                                                       'pip install "peft>=0.20,<0.23"')):
            requirements.require_versions()
    finally:
        requirements.require_versions.cache_clear()


@pytest.mark.parametrize("package, found", [("transformers", "4.57.6"), ("peft", "0.14.0"), ("bitsandbytes", "0.45.5")])
def test_an_old_library_is_named_with_the_command_that_fixes_it(package, found, monkeypatch, tmp_path):
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: found if name == package else real(name))
    requirements.require_versions.cache_clear()
    try:
        floor = requirements.FLOORS[package]
        message = f'pissa_rs needs {package} >= {floor} (found {found}): pip install -U "{package}>={floor}"'
        with pytest.raises(ImportError, match=re.escape(message)):
            requirements.require_versions()
        # The CLI: that one line, exit 1, before any library is touched.
        from pissa_rs.cli import main

        from make_tiny_model import save_tiny_model

        model = save_tiny_model(tmp_path / "m", layers=1)
        assert _run_main(main, ["decompose", str(model), "-r", "2", "--dry-run"]) == (1, f"pissa-rs: error: {message}\n")
    finally:
        requirements.require_versions.cache_clear()


def _run_main(main, argv):
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def test_release_numbers_compare_as_versions():
    assert requirements.too_old("torch", "2.5.1+cu121") and not requirements.too_old("torch", "2.10.0")
    assert requirements.too_old("peft", "0.19.1") and not requirements.too_old("peft", "0.20.0.dev0")

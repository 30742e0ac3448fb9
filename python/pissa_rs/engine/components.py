"""EVA's calibration pass: PEFT's `get_eva_state_dict` loop, out of core. Step after step,
one batch of the samples (cycling through them, as PEFT cycles its dataloader) goes
through the decoder layers, made real one at a time from the checkpoint; PEFT's own
SVDHook (incremental PCA) on the first module of every shared input takes the batch while
that module's share of the rank distribution has not converged, and the distribution is
chosen again from every module's explained variance after each step. So each module sees
exactly the batches PEFT's loop gives it, and the ranks are PEFT's. Each hook's components
(its state's bulk: r * rho rows of its input's width, in float64) wait in a file of their own
between the layers that use them, so the loop holds one layer's, not the model's (PEFT holds
every layer's, besides the model); the states are saved after every pass over the samples, so
a killed pass resumes at the last one saved."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from .._pissa_rs import Checkpoint
from ..calibration.layers import LayerStack
from ..calibration.samples import CalibrationError, CalibrationSet
from ..calibration.statistics import input_owners, one_row_per_token, recording_inputs
from . import heap
from .resume import fault_point
from .sequential import padded_batch, target_layers

# PEFT's loop cycles the dataloader until every module has converged, with no bound. Few
# samples or a tau close to 1 take hundreds of passes (16 samples of TinyLlama's shapes in
# batches of 8: 147), so the bound is far beyond those: it only ends a pass that never settles.
MOST_EVA_PASSES = 1000

_STATE = "state.json"


def _unpadded_tokens(layer_input, model_input, layer_name: str):
    """PEFT's language-modeling selection of a layer input's unpadded tokens, the input taken
    one row per token first (MLA's latent, which PEFT's own function cannot index)."""
    from peft.tuners.lora.eva import prepare_layer_inputs_fn_language_modeling

    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if isinstance(x, torch.Tensor):
        layer_input = one_row_per_token(x)
    return prepare_layer_inputs_fn_language_modeling(layer_input, model_input, layer_name)


class _Loop:
    """PEFT's loop state over every target module of the model: which module's hook takes
    each input (the first given it), the hooks (SVDHook, one per such owner), which have
    converged (and so are off), and the rank distribution of the last step."""

    def __init__(self, names: list[str], ranks: dict[str, int], rho: float, tau: float, distribution,
                 parked_dir: Path):
        self.names = names  # every target module, the model's order
        self.distribution = distribution  # the method's (PEFT's) rank distribution
        self.max_components = {n: round(ranks[n] * rho) for n in names}
        self.budget = sum(ranks[n] for n in names)
        self.tau = tau
        self.owner: dict[str, str] = {}  # module -> the module whose hook takes its input
        self.hooks: dict[str, object] = {}  # owner -> PEFT's SVDHook, the model's order
        self.converged: dict[str, bool] = {}  # owner -> its hook is off
        self.rank_dist = dict(self.max_components)
        self.batches_seen: dict[str, int] = {}
        self.back_on = 0  # times a hook that had gone off came back on
        self.parked_dir = parked_dir  # each hook's components between the layers that use them
        self.parked: set[str] = set()  # owners whose components are in their file, not in memory

    def new_hook(self, owner: str):
        from peft.tuners.lora.eva import SVDHook

        return SVDHook(n_components=self.max_components[owner], sim_thresh=self.tau, name=owner,
                       prepare_layer_inputs_fn=_unpadded_tokens, gather_distributed_inputs=False)

    def add_owners(self, owner_of: dict[str, str]) -> None:
        """A layer's modules grouped by shared input (its first batch): the group's largest
        component count for all, and a hook on its first module (PEFT's equal-inputs map)."""
        for name, owner in owner_of.items():
            self.owner[name] = owner
            self.max_components[owner] = max(self.max_components[owner], self.max_components[name])
        for name, owner in owner_of.items():
            self.max_components[name] = self.rank_dist[name] = self.max_components[owner]
        for owner in dict.fromkeys(owner_of.values()):
            self.hooks[owner], self.converged[owner], self.batches_seen[owner] = self.new_hook(owner), False, 0

    def check(self) -> bool:
        """PEFT's check before each forward: a hook whose share has converged goes off, one
        whose share grew past what converged comes back on. True when all are off."""
        for owner, hook in self.hooks.items():
            done = bool(torch.all(hook.converged[: self.rank_dist[owner]]))
            if not self.converged[owner] and done:
                self.converged[owner] = True
            elif self.converged[owner] and not done:
                self.converged[owner] = False
                self.back_on += 1
        return all(self.converged.values())

    def redistribute(self) -> None:
        """PEFT's rank distribution after a step, once every hook has components."""
        if all(o in self.parked or hasattr(h.svd, "components_") for o, h in self.hooks.items()):
            ratios = {o: h.svd.explained_variance_ratio_ for o, h in self.hooks.items()}
            self.rank_dist = self.distribution(ratios, {n: self.owner[n] for n in self.names},
                                               self.max_components, self.budget)

    def parked_file(self, owner: str) -> Path:
        return self.parked_dir / f"{owner}.safetensors"

    def park(self, owners) -> None:
        """The owners' components to their files (replaced, never written in place) and out of
        memory. Stored transposed: PEFT's incremental PCA leaves them as a column-major view of
        a V twice as wide, and the file holds the live half, which `unpark` gives back in that
        layout, so the next step's arithmetic is the one PEFT's loop does."""
        from safetensors.torch import save_file

        self.parked_dir.mkdir(parents=True, exist_ok=True)
        for owner in owners:
            svd = self.hooks[owner].svd
            if not hasattr(svd, "components_"):  # no batch taken yet
                continue
            path = self.parked_file(owner)
            save_file({"components": svd.components_.mT.contiguous().cpu()}, str(path) + ".partial")
            os.replace(str(path) + ".partial", path)
            del svd.components_
            self.parked.add(owner)

    def unpark(self, owners, device: torch.device) -> None:
        from safetensors.torch import load_file

        for owner in owners:
            if owner in self.parked:
                stored = load_file(str(self.parked_file(owner)))["components"]
                self.hooks[owner].svd.components_ = stored.to(device).mT
                self.parked.discard(owner)

    def kept_components(self, owner: str, rows: int) -> torch.Tensor:
        """The first `rows` components of `owner`'s hook, on the host, read from its file."""
        from safetensors import safe_open

        if owner not in self.parked:
            return self.hooks[owner].svd.components_[:rows].cpu().clone()
        with safe_open(str(self.parked_file(owner)), "pt") as f:
            return f.get_slice("components")[:, :rows].mT.clone()

    def on(self, owners) -> list[str]:
        return [o for o in owners if not self.converged[o]]

    # Saved after each pass: every hook's incremental PCA as tensors, the rest as JSON.
    def save(self, folder: Path, step: int, identity: str) -> None:
        from safetensors.torch import save_file

        tensors, scalars = {}, {}
        for owner, hook in self.hooks.items():
            tensors[f"{owner}|converged"] = hook.converged.contiguous()
            scalars[owner] = {}
            for attr, value in vars(hook.svd).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{owner}|{attr}"] = value.detach().contiguous().cpu()
                else:
                    scalars[owner][attr] = value
        name = f"hooks-{step:06d}.safetensors"
        save_file(tensors, str(folder / f"{name}.partial"))
        os.replace(folder / f"{name}.partial", folder / name)
        # the parked components as their files are now: links, since a file is replaced, never changed
        kept = folder / f"parked-{step:06d}"
        shutil.rmtree(kept, ignore_errors=True)
        kept.mkdir()
        for owner in self.parked:
            _link(self.parked_file(owner), kept / self.parked_file(owner).name)
        state = {"identity": identity, "step": step, "hooks": name, "owner": self.owner, "scalars": scalars,
                 "converged": self.converged, "rank_dist": self.rank_dist, "max_components": self.max_components,
                 "batches_seen": self.batches_seen, "back_on": self.back_on,
                 "parked": {"folder": kept.name, "owners": sorted(self.parked)}}
        (folder / f"{_STATE}.partial").write_text(json.dumps(state))
        os.replace(folder / f"{_STATE}.partial", folder / _STATE)
        for old in folder.glob("hooks-*.safetensors"):
            if old.name != name:
                old.unlink()
        for old in folder.glob("parked-*"):
            if old.name != kept.name:
                shutil.rmtree(old)

    def load(self, folder: Path, identity: str, device: torch.device) -> int:
        """The last saved pass (its step), or 0 when none was saved for this identity."""
        from safetensors.torch import load_file

        path = folder / _STATE
        if not path.is_file():
            return 0
        state = json.loads(path.read_text())
        if state.get("identity") != identity or "parked" not in state:
            return 0
        tensors = load_file(str(folder / state["hooks"]))
        self.owner, self.converged = state["owner"], state["converged"]
        self.rank_dist, self.max_components = state["rank_dist"], state["max_components"]
        self.batches_seen, self.back_on = state["batches_seen"], state["back_on"]
        for owner in state["scalars"]:
            hook = self.new_hook(owner)
            for attr, value in state["scalars"][owner].items():
                setattr(hook.svd, attr, value)
            for key, value in tensors.items():
                where, _, attr = key.partition("|")
                if where == owner:
                    if attr == "converged":
                        hook.converged = value
                    else:
                        setattr(hook.svd, attr, value.to(device))
            self.hooks[owner] = hook
        for owner in state["parked"]["owners"]:  # the files as they were at that pass, not as a killed run left them
            partial = Path(str(self.parked_file(owner)) + ".partial")
            partial.unlink(missing_ok=True)
            _link(folder / state["parked"]["folder"] / self.parked_file(owner).name, partial)
            os.replace(partial, self.parked_file(owner))
            self.parked.add(owner)
        return state["step"]


def _link(source: Path, target: Path) -> None:
    """`target` names `source`'s bytes: a hard link, or a copy where the filesystem has none."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def collect_components(targets, checkpoint: Checkpoint, calibration: CalibrationSet, options, scratch: Path,
                       identity: str, progress: bool = False
                       ) -> tuple[list[tuple[int, str, torch.Tensor, torch.Tensor, torch.Tensor]], dict]:
    """For every target (plan order index), the components PEFT's EVA loop leaves its hook
    with. Returns the targets in the model's module order as (index, owner, components,
    explained variance ratios, singular values), `owner` the module whose hook took its
    input, and what the report says of the pass. `scratch` holds the saved passes: a pass
    killed and started again with the same `identity` resumes at the last one saved.
    `progress`: a bar of steps with the hooks converged so far, as PEFT's loop shows."""
    from tqdm.auto import tqdm

    device = options.torch_devices[0]
    heap.bound_heap()  # each step frees MiB-sized tensors among the hooks' states, which live on
    # every step reads the layers again: from the page cache where the model fits (dropped at the end)
    stack = LayerStack(checkpoint, Path(checkpoint.root), device, options.calibration_dtype, keep_cached=True)
    located = target_layers(targets, stack.layers_name)
    index_of = {(layer, inner): index for index, (layer, inner, _) in enumerate(located)}
    inner_of: dict[int, dict[str, str]] = {}  # layer -> {name inside it: module name}, the model's order
    for layer in sorted({layer for layer, _ in index_of}):
        inner_of[layer] = {name: targets[index_of[(layer, name)]].module
                           for name, _ in stack.real[layer].named_modules() if (layer, name) in index_of}
    names = [module for layer in inner_of for module in inner_of[layer].values()]
    loop = _Loop(names, {t.module: t.r for t in targets}, options.eva_rho, options.eva_tau,
                 options.init_method.rank_distribution, scratch / "parked")
    batches = calibration.batches(options.calibration_batch)
    scratch.mkdir(parents=True, exist_ok=True)
    start = step = loop.load(scratch, identity, device)
    t0 = time.perf_counter()
    with tqdm(desc="components", unit="step", initial=step, disable=not progress) as bar:
        while True:
            if step and loop.check():
                break
            if step >= MOST_EVA_PASSES * len(batches):
                late = [o for o in loop.hooks if not loop.converged[o]]
                raise CalibrationError(f"calibration: the components of {late} did not converge "
                                       f"(tau {options.eva_tau}) "
                                       f"in {MOST_EVA_PASSES} passes over the samples; give more calibration samples, "
                                       "or a lower eva_tau")
            k = step % len(batches)
            _step(stack, loop, inner_of, calibration, batches[k], k, device, first=step == 0)
            loop.redistribute()
            step += 1
            bar.update()
            bar.set_postfix_str(f"{sum(loop.converged.values())}/{len(loop.hooks)} inputs converged", refresh=False)
            if step % len(batches) == 0:
                loop.save(scratch, step, identity)
    found, index_of_module = [], {t.module: i for i, t in enumerate(targets)}
    rows: dict[str, int] = {}  # owner -> the most components a module given its input keeps
    for module in names:
        rows[loop.owner[module]] = max(rows.get(loop.owner[module], 0), loop.rank_dist[module])
    kept: dict[str, torch.Tensor] = {}  # only what the adapter takes, read one owner at a time
    for module in names:
        owner = loop.owner[module]
        hook = loop.hooks[owner]
        rank = loop.rank_dist[module]
        if not bool(torch.all(hook.converged[:rank])):
            raise CalibrationError(f"calibration: {module} was given rank {rank} but its components did not converge")
        if owner not in kept:
            kept[owner] = loop.kept_components(owner, rows[owner])
        found.append((index_of_module[module], owner, kept[owner], hook.svd.explained_variance_ratio_.cpu(),
                      hook.svd.singular_values_.cpu()))
    record = {**calibration.as_record(), "batch": options.calibration_batch,
              "dtype": str(stack.dtype).removeprefix("torch."), "layers": len(stack),
              "steps": step, "passes": step / len(batches), "resumed_at_step": start,
              "batches_seen": loop.batches_seen, "hooks_back_on": loop.back_on, "seconds": {"forward": time.perf_counter() - t0}}
    return found, record


def _step(stack: LayerStack, loop: _Loop, inner_of: dict[int, dict[str, str]], calibration: CalibrationSet,
          batch: tuple[int, ...], k: int, device: torch.device, first: bool) -> None:
    """Batch `k` through the layers up to the last one with a hook on; each hook that is on
    takes its module's input. On the first step the layers' shared inputs are found and
    their hooks made (PEFT's hashing forward, whose batch its loop then feeds them too)."""
    ids, mask, _ = padded_batch(calibration, batch)
    positions = mask.to(device).bool().nonzero()
    wanted = [layer for layer, inner in inner_of.items()
              if first or loop.on(dict.fromkeys(loop.owner[m] for m in inner.values()))]
    x = None
    for layer_index in range(max(wanted) + 1):
        layer = stack.layer(layer_index)
        inner = inner_of.get(layer_index, {})
        modules = {name: layer.get_submodule(name) for name in inner}
        inputs: dict[str, torch.Tensor] = {}
        handles = recording_inputs(modules, inputs) if first else []
        taking = [] if first else [inner[n] for n in modules if loop.owner[inner[n]] == inner[n]
                                   and not loop.converged[inner[n]]]
        loop.unpark(taking, device)
        for name, module in modules.items():
            owner = inner[name]
            if owner in taking:
                hook = loop.hooks[owner]
                hook.model_input = positions
                handles.append(module.register_forward_hook(hook))
                loop.batches_seen[owner] += 1
        given, args, kwargs = stack.call_of(layer_index, ids, mask)
        try:
            with torch.no_grad():
                out = layer(given if x is None else x, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        x = out[0] if isinstance(out, tuple) else out
        loop.park(taking)
        if first and modules:
            owner_of = {inner[name]: inner[o] for name, o in input_owners({n: inputs[n] for n in modules}).items()}
            loop.add_owners(owner_of)
            for name, module in modules.items():
                owner = inner[name]
                if owner_of[owner] == owner:
                    hook = loop.hooks[owner]
                    hook.model_input = positions
                    hook(module, (inputs[name],), None)
                    loop.batches_seen[owner] += 1
            loop.park(dict.fromkeys(owner_of.values()))
        stack.release(layer_index)
        fault_point("calibrate")  # the crash tests: killed mid-pass

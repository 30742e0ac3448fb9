"""LoRA-GA's gradient pass, one decoder layer at a time: the samples forward through the
original model (each layer boundary's hidden states kept in a file), the model's own
causal-LM loss at the head gives the gradient at the last boundary, then from the last layer
down each layer is made real again, its forward recomputed from its saved input with
gradients on, the gradient from above pushed through it: its targets' weight gradients add
up over the batches (float32), its input's gradient goes to a file for the layer below. As a
layer is done, each target's mean gradient goes to its method (`gradient_statistic`: LoRA-GA
keeps the top 2r triplets) and only that is kept. State is saved after every layer of both
passes, so a killed pass resumes at the layer it was in, with the same bytes.

How it differs from autograd over the whole model (PEFT's `preprocess_loraga`): the same
operations per batch, each layer's backward seeded with the gradient autograd would hand it;
autograd over the whole graph may add a tensor's gradient contributions in another order, so
the gradients agree within float32 rounding of those sums, not bit for bit."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import torch

from .._pissa_rs import Checkpoint
from ..calibration.head import HeadLoss
from ..calibration.layers import LayerStack
from ..calibration.samples import CalibrationSet
from ..factors import tensor_seed
from . import heap
from .resume import fault_point
from .sequential import HiddenStates, padded_batch, target_layers

_STATE = "state.json"


class GradientStatistics:
    """Tensor name -> its statistic, read from the pass's files when a unit asks for it."""

    def __init__(self, folder: Path, where: dict[str, tuple[str, int]], build: Callable):
        self.folder, self.where, self.build = folder, where, build

    def __getitem__(self, tensor: str):
        from safetensors import safe_open

        name, index = self.where[tensor]
        with safe_open(str(self.folder / name), framework="pt") as f:  # this target's tensors, not its layer's
            return self.build({k.partition(".")[2]: f.get_tensor(k) for k in f.keys()
                               if k.partition(".")[0] == str(index)})


class _Pass:
    """The pass's files in `folder` and its state.json, replaced atomically after each layer."""

    def __init__(self, folder: Path, identity: str):
        self.folder, self.identity = folder, identity
        self.state: dict = {"identity": identity, "phase": "forward", "next_layer": 0, "hidden": {}, "grad": None,
                            "loss": [], "norms": {}, "triplets": {}, "seconds": {"forward": 0.0, "backward": 0.0}}

    def load(self) -> bool:
        path = self.folder / _STATE
        if not path.is_file():
            return False
        state = json.loads(path.read_text())
        if state.get("identity") != self.identity:
            return False
        self.state = state
        return True

    def save(self) -> None:
        partial = self.folder / f"{_STATE}.partial"
        partial.write_text(json.dumps(self.state))
        os.replace(partial, self.folder / _STATE)

    def file(self, kind: str, layer: int) -> Path:
        return self.folder / f"{kind}-{layer:05d}.bin"

    def states(self, kind: str, layer: int) -> HiddenStates:
        recorded = self.state["hidden"][str(layer)] if kind == "hidden" else self.state["grad"]
        return HiddenStates(self.file(kind, layer), [tuple(i) for i in recorded["index"]], recorded["dtype"])

    def finished(self, kind: str, layer: int, states: HiddenStates) -> HiddenStates:
        done = states.finish(self.file(kind, layer))
        record = {"index": done.index, "dtype": done.dtype}
        if kind == "hidden":
            self.state["hidden"][str(layer)] = record
        else:
            self.state["grad"] = {**record, "layer": layer}
        return done

    def save_and_drop(self, *files: Path) -> None:
        """The state saved, then the files it no longer names removed (a kill in between
        leaves a file too many, never a state naming a file that is gone)."""
        self.save()
        for path in files:
            path.unlink(missing_ok=True)


def gradient_pass(targets, checkpoint: Checkpoint, calibration: CalibrationSet, options, scratch: Path,
                  identity: str, progress: bool = False) -> tuple[GradientStatistics, dict]:
    """Every target's statistic from its mean gradient of the causal-LM loss on `calibration`
    (the method's `gradient_statistic`), as a mapping by tensor name read from files in
    `scratch`, and what the report says of the pass. A pass killed and started again with the
    same `identity` resumes at the layer it was in."""
    from tqdm.auto import tqdm

    method = options.init_method
    device = options.torch_devices[0]
    heap.bound_heap()
    stack = LayerStack(checkpoint, Path(checkpoint.root), device, options.calibration_dtype)
    head = HeadLoss(stack)
    located = target_layers(targets, stack.layers_name)
    by_layer: dict[int, list[tuple[int, str, int | None]]] = {}
    for index, (layer, inner, expert) in enumerate(located):
        by_layer.setdefault(layer, []).append((index, inner, expert))
    lowest = min(by_layer)
    batches = calibration.batches(options.calibration_batch)
    scratch.mkdir(parents=True, exist_ok=True)
    state = _Pass(scratch, identity)
    resumed = state.load()
    resumed_at = {"phase": state.state["phase"], "layer": state.state["next_layer"]} if resumed else None
    layers = len(stack)
    with tqdm(total=layers + (layers - lowest), desc="lora-ga pass", unit="layer", disable=not progress) as bar:
        if state.state["phase"] == "forward":
            _forward(stack, state, calibration, batches, device, bar)
            state.state.update(phase="backward", next_layer=layers)
            state.save()
        else:
            bar.update(layers)
        if state.state["phase"] == "backward":
            bar.update(layers - min(state.state["next_layer"], layers))
            _backward(stack, head, state, calibration, batches, by_layer, targets, lowest, options, bar)
            left = [state.file("hidden", int(layer)) for layer in state.state["hidden"]]
            state.state.update(phase="done", next_layer=lowest, hidden={}, grad=None)
            state.save_and_drop(*left)  # what is left: the triplets, and the record
    where = {targets[int(i)].tensor: (name, int(i)) for i, name in state.state["triplets"].items()}
    statistics = GradientStatistics(scratch, where, lambda found: method.statistic_from_tensors(found, options))
    losses = state.state["loss"]
    record = {**calibration.as_record(), "batch": options.calibration_batch,
              "dtype": str(stack.dtype).removeprefix("torch."), "layers": layers, "resumed_at": resumed_at,
              "loss": sum(losses) / len(losses), "batch_losses": losses,
              "gradient_norms": {targets[int(i)].tensor: n for i, n in sorted(state.state["norms"].items(),
                                                                               key=lambda kv: int(kv[0]))},
              "seconds": state.state["seconds"]}
    return statistics, record


def _parameter(layer, inner: str, module: bool) -> torch.nn.Parameter:
    """The parameter a target names inside its layer: a module's weight, or a parameter by name."""
    if module:
        return layer.get_submodule(inner).weight
    owner, _, name = inner.rpartition(".")
    return getattr(layer.get_submodule(owner), name)


def _forward(stack: LayerStack, state: _Pass, calibration, batches, device, bar) -> None:
    """The samples through every layer from the original weights, each boundary's hidden
    states to a file (hidden-l: layer l's input; hidden-L: the last layer's output)."""
    start = state.state["next_layer"]
    bar.update(start)
    hidden = state.states("hidden", start) if start else None
    if start:
        stack.forget_input_embedding()
    for layer_index in range(start, len(stack)):
        t0 = time.perf_counter()
        layer = stack.layer(layer_index)
        inputs = HiddenStates(state.file("hidden", layer_index).with_suffix(".partial")) if layer_index == 0 else None
        outputs = HiddenStates(state.file("hidden", layer_index + 1).with_suffix(".partial"))
        for k, batch in enumerate(batches):
            ids, mask, _ = padded_batch(calibration, batch)
            given, args, kwargs = stack.call_of(layer_index, ids, mask)
            x = given if hidden is None else hidden[k].to(device)
            if inputs is not None:
                inputs.append(x)
            with torch.no_grad():
                out = layer(x, *args, **kwargs)
            outputs.append(out[0] if isinstance(out, tuple) else out)
            fault_point("calibrate")
        stack.release(layer_index)
        if inputs is not None:
            state.finished("hidden", 0, inputs)
            # past the first layer the model's forward needs the embeddings' shape and dtype only
            # (the loss's head is read on its own, tied or not): the vocabulary goes
            stack.forget_input_embedding()
        hidden = state.finished("hidden", layer_index + 1, outputs)
        state.state["next_layer"] = layer_index + 1
        state.state["seconds"]["forward"] += time.perf_counter() - t0
        state.save()
        bar.update()


def _backward(stack: LayerStack, head: HeadLoss, state: _Pass, calibration, batches, by_layer, targets, lowest: int,
              options, bar) -> None:
    """From the loss down to the lowest layer with a target: each layer's forward recomputed
    from its saved input with gradients on, the gradient from above pushed through it."""
    from safetensors.torch import save_file

    device, method = stack.device, options.init_method
    layers = len(stack)
    start = state.state["next_layer"]
    if start == layers:  # the loss and its gradient at the last boundary
        t0 = time.perf_counter()
        last = state.states("hidden", layers)
        grads = HiddenStates(state.file("grad", layers).with_suffix(".partial"))
        losses = []
        for k, batch in enumerate(batches):
            ids, mask, _ = padded_batch(calibration, batch)
            loss, grad = head.loss_and_gradient(last[k], ids, mask)
            losses.append(loss)
            grads.append(grad)
        state.finished("grad", layers, grads)
        state.state["loss"] = losses
        del state.state["hidden"][str(layers)]
        state.state["next_layer"] = layers - 1
        state.state["seconds"]["backward"] += time.perf_counter() - t0
        state.save_and_drop(state.file("hidden", layers))
        start = layers - 1
    for layer_index in range(start, lowest - 1, -1):
        t0 = time.perf_counter()
        above = state.states("grad", layer_index + 1)
        inputs = state.states("hidden", layer_index)
        layer = stack.layer(layer_index)
        # each target's parameter: a linear module's weight, or one PEFT wraps (an expert stack,
        # whose experts are targets of their own and share its gradient, or a router)
        wanted = by_layer.get(layer_index, [])
        params = {inner: _parameter(layer, inner, targets[i].parameter is None) for i, inner, _ in wanted}
        for param in params.values():
            param.requires_grad_(True)
        sums = {inner: torch.zeros(p.shape, dtype=torch.float32, device=device) for inner, p in params.items()}
        below = (HiddenStates(state.file("grad", layer_index).with_suffix(".partial"))
                 if layer_index > lowest else None)
        for k, batch in enumerate(batches):
            ids, mask, _ = padded_batch(calibration, batch)
            _, args, kwargs = stack.call_of(layer_index, ids, mask)
            x = inputs[k].to(device).requires_grad_(below is not None)
            with torch.enable_grad():
                out = layer(x, *args, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                out.backward(above[k].to(device))
            for inner, param in params.items():  # PEFT's .grad, summed batch after batch in this order
                if param.grad is not None:  # (an expert stack no token reached this batch: none)
                    sums[inner] += param.grad.to(torch.float32)
                param.grad = None
            if below is not None:
                below.append(x.grad)
            fault_point("calibrate")
        saved = {}
        for i, inner, expert in wanted:
            total = sums[inner] if expert is None else sums[inner][expert]
            mean = total / len(batches)  # PEFT divides by its hook's count of backward calls
            if targets[i].fan_in_fan_out:
                mean = mean.T
            state.state["norms"][str(i)] = torch.linalg.vector_norm(mean).item()
            statistic = method.gradient_statistic(mean, targets[i].r, tensor_seed(options.seed, targets[i].tensor),
                                                  options)
            saved.update({f"{i}.{k}": v.to("cpu") for k, v in statistic.tensors().items()})
            del mean, total
        sums = params = None
        stack.release(layer_index)
        if saved:
            name = f"triplets-{layer_index:05d}.safetensors"
            save_file(saved, str(state.folder / f"{name}.partial"))
            os.replace(state.folder / f"{name}.partial", state.folder / name)
            state.state["triplets"].update({str(i): name for i, _, _ in wanted})
        if below is not None:
            state.finished("grad", layer_index, below)
        else:
            state.state["grad"] = None
        del state.state["hidden"][str(layer_index)]  # this layer's input: read for the last time
        state.state["next_layer"] = layer_index - 1
        state.state["seconds"]["backward"] += time.perf_counter() - t0
        state.save_and_drop(state.file("grad", layer_index + 1), state.file("hidden", layer_index))
        bar.update()

"""SaveAsLoRA: a transformers TrainerCallback (TRL's trainers are Trainers) that writes,
beside every checkpoint the trainer saves and at the end of training, the trained adapter
as a LoRA of the ORIGINAL model (`convert_to_lora`, out of core): what a server loads, with
no residual model to ship. Its own module because it subclasses transformers' class, which
`import pissa_rs` must not import; `pissa_rs.training.SaveAsLoRA` finds it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .constants import ADAPTER_CONFIG, ADAPTER_SUBDIR
from .convert import SERVERS, Truncation, convert_to_lora

LORA_FOLDER = "lora_of_original"  # CHECKPOINT/lora_of_original, OUTPUT_DIR/lora_of_original


class SaveAsLoRA(TrainerCallback):
    """At every save (CHECKPOINT/lora_of_original) and at the end of training
    (OUTPUT_DIR/lora_of_original), the adapter being trained converted to a LoRA of the
    original model, with to-lora's options (`rank`, `energy`, `serve`, `compact`).

    `decomposition`: the pissa_rs output the model was loaded from (its pissa_init is the
    initial adapter the conversion needs). Only the main process writes."""

    def __init__(self, decomposition: str | os.PathLike[str], *, rank: int | None = None,
                 energy: float | None = None, serve: str | None = None, compact: bool = False,
                 folder: str = LORA_FOLDER):
        self.init_dir = Path(decomposition) / ADAPTER_SUBDIR
        if not (self.init_dir / ADAPTER_CONFIG).is_file():
            raise FileNotFoundError(f"{self.init_dir / ADAPTER_CONFIG}: missing; SaveAsLoRA needs the pissa_rs output "
                                    "the model was loaded from")
        Truncation(1e-6, rank, energy)  # a bad rank or energy is named now, not at the first save
        if serve is not None and serve not in SERVERS:
            raise ValueError(f"serve must be one of {', '.join(SERVERS)}, got {serve!r}")
        self.options = {"rank": rank, "energy": energy, "serve": serve, "compact": compact}
        self.folder = folder
        self.written: list[Path] = []  # the LoRAs written so far, in order

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            self._convert(checkpoint, checkpoint / self.folder)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=args.output_dir) as tuned:
                model.save_pretrained(tuned)  # the trained adapter as it stands (the default one at the top)
                self._convert(Path(tuned), Path(args.output_dir) / self.folder)

    def _convert(self, tuned: Path, out: Path) -> None:
        if out.exists():  # ours from an earlier save of the same step (a resumed run): written again
            shutil.rmtree(out)
        convert_to_lora(self.init_dir, tuned, out, **self.options)
        self.written.append(out)

"""ROSA inside transformers' ``Trainer`` (and TRL's ``SFTTrainer``, a Trainer): the resample schedule
as a callback.

    model = apply_rosa(AutoModelForCausalLM.from_pretrained(...), RosaConfig(rank=16))
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[RosaCallback(resample_every=200, merged_dir="out/merged")])

The Trainer builds its optimizer over the trainable parameters, which after ``apply_rosa`` are the
factors alone; every ``resample_every`` optimizer steps (or at each epoch's end with ``"epoch"``) the
callback folds the factors into the weights, splits on a new window and clears the factors' state in
the Trainer's own optimizer (Adam's moments and step: their meaning changed), as rosa-train does.
At the end it writes the merged model (the original architecture, plain weights) to ``merged_dir``.
"""
from __future__ import annotations

from typing import Literal, Union

from transformers import TrainerCallback

from .export import save_merged
from .resample import resample


class RosaCallback(TrainerCallback):
    """Resample every ``resample_every`` optimizer steps (``"epoch"``: at each epoch's end; ``None``:
    never), resetting the factors' optimizer state unless ``reset_optimizer`` is False; write the
    merged model to ``merged_dir`` when training ends. ``events`` lists (step, seconds) per resample."""

    def __init__(self, resample_every: Union[int, Literal["epoch"], None] = 200, *, reset_optimizer: bool = True,
                 merged_dir: str | None = None):
        if not (resample_every is None or resample_every == "epoch"
                or (isinstance(resample_every, int) and not isinstance(resample_every, bool) and resample_every >= 1)):
            raise ValueError(f"resample_every must be >= 1, 'epoch' or None, got {resample_every!r}")
        self.resample_every = resample_every
        self.reset_optimizer = reset_optimizer
        self.merged_dir = merged_dir
        self.events: list[tuple[int, float]] = []

    def _resample(self, state, model, optimizer) -> None:
        seconds = resample(model, optimizer if self.reset_optimizer else None)
        self.events.append((state.global_step, seconds))
        if state.log_history is not None:
            state.log_history.append({"step": state.global_step, "resample_s": seconds})

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        every = self.resample_every
        if isinstance(every, int) and state.global_step % every == 0 and state.global_step < state.max_steps:
            self._resample(state, model, optimizer)  # not after the last step: the export merges anyway

    def on_epoch_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.resample_every == "epoch" and state.global_step < state.max_steps:
            self._resample(state, model, optimizer)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.merged_dir is not None:
            save_merged(model, processing_class, self.merged_dir)

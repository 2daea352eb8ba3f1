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

import math
from typing import Literal, Union

from transformers import TrainerCallback

from .export import save_merged
from .resample_schedule import ResampleSchedule


class RosaCallback(TrainerCallback):
    """Resample every ``resample_every`` optimizer steps (``"epoch"``: at each epoch's end; ``None``:
    never), spread over ``resample_stagger`` steps, resetting the factors' optimizer state unless
    ``reset_optimizer`` is False, and ramping the Trainer's learning rate up again over
    ``rewarm_steps`` steps after each; write the merged model to ``merged_dir`` when training ends.
    The options are rosa-train's, with its defaults and its schedule (``ResampleSchedule``).
    ``events`` lists (step, seconds) per resample (per part when spread)."""

    def __init__(self, resample_every: Union[int, Literal["epoch"], None] = 200, *, reset_optimizer: bool = True,
                 merged_dir: str | None = None, resample_stagger: int = 1, rewarm_steps: int = 0):
        if not (resample_every is None or resample_every == "epoch"
                or (isinstance(resample_every, int) and not isinstance(resample_every, bool) and resample_every >= 1)):
            raise ValueError(f"resample_every must be >= 1, 'epoch' or None, got {resample_every!r}")
        if resample_stagger < 1 or (isinstance(resample_every, int) and resample_stagger > resample_every):
            raise ValueError(f"resample_stagger must be between 1 and resample_every, got {resample_stagger}")
        if rewarm_steps < 0:
            raise ValueError(f"rewarm_steps must be >= 0, got {rewarm_steps}")
        self.resample_every = resample_every
        self.merged_dir = merged_dir
        self.schedule = ResampleSchedule(resample_every if isinstance(resample_every, int) else None,
                                         stagger=resample_stagger, reset_optimizer=reset_optimizer,
                                         rewarm_steps=rewarm_steps)
        self.events: list[tuple[int, float]] = []

    def _record(self, state, record: dict) -> None:
        if record:
            self.events.append((state.global_step, record["resample_s"]))
            if state.log_history is not None:
                state.log_history.append({"step": state.global_step, **record})

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        """``"epoch"`` becomes the Trainer's optimizer steps per epoch (its own count: micro-batches over
        accumulation, rounded up), so an epoch's resample follows the one schedule, re-warmup included,
        as in rosa-train."""
        if self.resample_every != "epoch":
            return
        try:
            batches = len(train_dataloader)
        except TypeError:
            raise ValueError("resample_every='epoch' needs a train dataset with a length; give a number of steps") from None
        steps = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
        if self.schedule.stagger > steps:
            raise ValueError(f"resample_stagger ({self.schedule.stagger}) must not exceed the {steps} steps of an epoch")
        self.schedule.every = steps

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        """The Trainer's scheduler set this step's rate; scale it for the re-warmup (the scheduler
        sets the next one from its base rates again, so nothing compounds)."""
        factor = self.schedule.rewarm(state.global_step)
        if factor != 1.0 and optimizer is not None:
            for group in optimizer.param_groups:
                group["lr"] *= factor

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._record(state, self.schedule.after_step(state.global_step, state.max_steps, model, optimizer))

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.merged_dir is not None:
            save_merged(model, processing_class, self.merged_dir)

"""The resample schedule of a run, asked after every optimizer step by rosa-train and by RosaCallback.

Which steps resample (every ``every`` steps, spread over ``stagger`` steps: ``schedule.resample_part``),
whether the factors' optimizer state is cleared, the learning rate's re-warmup after each resample
(``schedule.rewarm_factor``), and what each resample leaves in the metrics. A pure function of the
step apart from the count of finished resamples, which a resumed run restores.
"""
from __future__ import annotations

from .resample import resample
from .schedule import resample_part, rewarm_factor


class ResampleSchedule:
    def __init__(self, every: int | None, *, stagger: int = 1, reset_optimizer: bool = True, rewarm_steps: int = 0,
                 completed: int = 0):
        self.every, self.stagger, self.reset_optimizer = every, stagger, reset_optimizer
        self.rewarm_steps, self.completed = rewarm_steps, completed

    def rewarm(self, step: int) -> float:
        """The learning-rate factor of 0-based step ``step`` for the re-warmup after a resample."""
        return rewarm_factor(step, self.every, self.rewarm_steps) if self.every else 1.0

    def after_step(self, step: int, total: int, model, optimizer) -> dict:
        """Resample (a part of) the model if optimizer step ``step`` of ``total`` calls for it, every
        process together; returns the metrics record of it (``resample_s``, ``resample_part`` when
        spread), empty when the step does not resample. Never after the last step: the export merges."""
        part = resample_part(step, self.every, self.stagger, total)
        if part is None:
            return {}
        spread = (part, self.stagger) if self.stagger > 1 else None
        record = {"resample_s": resample(model, optimizer if self.reset_optimizer else None, part=spread)}
        if spread:
            record["resample_part"] = part + 1
        if part == self.stagger - 1:
            self.completed += 1
        return record

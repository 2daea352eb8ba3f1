"""A rosa-train run under way: the loop over optimizer steps and the bookkeeping around each.

``TrainingRun`` holds the model, optimizer and loaders that ``rosa_scale.train`` set up, where the
run is (step, epoch, micro-batches into the epoch, resamples, skipped steps), and does what each
step needs besides the step itself: metrics, resamples (``ResampleSchedule``, shared with
``RosaCallback``), evaluation, checkpoints, signals and divergence; then the end: the last
evaluation, the merged export and the summary.
"""
from __future__ import annotations

import gc
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoint import FOLDER, complete_checkpoints, load_checkpoint, save_checkpoint
from .chunked_loss import loss_inside_forward
from .config import TrainConfig, to_dict
from .engines import engine_for
from .engines.fsdp2 import is_sharded, replicated_factors
from .export import save_merged
from .guard import DivergedError, agree, check_layers, nonfinite, nonfinite_grads
from .loading import DTYPES
from .model import adapter_parameters, rosa_layers
from .packing import IGNORE
from .resample_schedule import ResampleSchedule
from .run_model import zero3_fast_leaf_fetch


def batch_inputs(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Input ids, labels (chat data and padding: -100 where nothing is learned) and position ids
    (packed documents: restarting at each, so none sees another; else None)."""
    ids = batch["input_ids"]
    return ids, batch.get("labels", ids), batch.get("position_ids")


@torch.no_grad()
def evaluate(model, loader, accelerator, module=None, chunk_tokens: int | None = None) -> float:
    """Mean next-token loss per block over the held-out set, across all processes (the LM head and
    the loss ``chunk_tokens`` at a time when given: ``module`` is the causal LM inside ``model``)."""
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        ids, labels, positions = batch_inputs(batch)
        if chunk_tokens:
            nll = loss_inside_forward(model, module, ids, chunk_tokens=chunk_tokens, per_sequence=True, labels=labels,
                                      position_ids=positions)
        else:
            logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits[:, :-1].float()
            target = labels[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
            nll = nll.view(ids.shape[0], -1).sum(1) / (target != -100).sum(1).clamp(min=1)
        nll = accelerator.gather_for_metrics(nll)
        total += nll.double().sum().item()
        count += nll.numel()
    model.train()
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    """Perplexity; an overflow is inf, not an exception."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def _apply_overrides(overridden: list[str], cfg: TrainConfig, optimizer, scheduler) -> None:
    """Overridden optimizer settings take effect although the checkpoint restored the old ones."""
    if "lr" in overridden:
        scheduler.base_lrs = [cfg.lr for _ in scheduler.base_lrs]
        for group, factor in zip(optimizer.param_groups, [lam(scheduler.last_epoch) for lam in scheduler.lr_lambdas]):
            group["initial_lr"], group["lr"] = cfg.lr, cfg.lr * factor
    if "weight_decay" in overridden:
        for group in optimizer.param_groups:
            group["weight_decay"] = cfg.weight_decay


class TrainingRun:
    """A run under way: its model, optimizer and loaders, where it is (step, epoch, micro-batches into
    the epoch, resamples, skipped steps), and the bookkeeping around each optimizer step: metrics,
    resamples, evaluation, checkpoints, signals and divergence."""

    def __init__(self, cfg, accelerator, model, module, optimizer, torch_optimizer, scheduler, train_loader,
                 eval_loader, tokenizer, watch, held, *, deepspeed: bool, total: int, resamples: ResampleSchedule,
                 compiled: int):
        self.cfg, self.accelerator, self.model, self.module = cfg, accelerator, model, module
        self.optimizer, self.torch_optimizer, self.scheduler = optimizer, torch_optimizer, scheduler
        self.train_loader, self.eval_loader, self.tokenizer = train_loader, eval_loader, tokenizer
        self.watch, self.held, self.deepspeed, self.total, self.resamples = watch, held, deepspeed, total, resamples
        self.compiled = compiled  # decoder layers compiled, for the summary
        self.out = Path(cfg.output_dir)
        self.params = adapter_parameters(module)
        self.replicated_factors = bool(replicated_factors(module)) and is_sharded(module)
        self.layers = rosa_layers(module)
        self.engine_ops = engine_for(module)
        self.engine = self.engine_ops.name
        self.step, self.epoch, self.batches, self.skip, self.skipped = 0, 0, 0, 0, 0
        self.eval_before, self.saved_step, self.metrics = None, None, None

    # ------------------------------------------------------------------ state

    def restore(self, resume_from: Path, saved: dict, overridden: list[str]) -> None:
        state = load_checkpoint(resume_from, model=self.model, module=self.module, optimizer=self.torch_optimizer,
                                state=saved, expect={"engine": self.engine,
                                                     "world_size": self.accelerator.num_processes})
        self.scheduler.load_state_dict(state["scheduler"])
        _apply_overrides(overridden, self.cfg, self.torch_optimizer, self.scheduler)
        self.step, self.epoch, self.skip = state["step"], state["epoch"], state["batches_in_epoch"]
        self.batches = self.skip
        self.resamples.completed, self.eval_before = state["resamples"], state["eval_loss_before"]
        self.skipped = state.get("skipped_steps", 0)
        if resume_from.parent == self.out / FOLDER:  # this step's checkpoint exists: never written again
            self.saved_step = self.step

    def checkpoint(self) -> None:
        """Save (unless this step's checkpoint exists already); never with non-finite factors."""
        if self.saved_step == self.step:  # saved at this step already, or resumed from it here
            return
        try:
            check_layers(self.layers, f"saving the checkpoint of step {self.step}")
        except DivergedError as err:
            raise self.diverged(str(err)) from None
        epoch, batches = self.epoch, self.batches
        if batches == len(self.train_loader):  # the epoch is done: resume at the next one
            epoch, batches = epoch + 1, 0
        cfg = self.cfg
        save_checkpoint(self.out, self.step, model=self.model, module=self.module, optimizer=self.torch_optimizer,
                        tokenizer=self.tokenizer, keep_last=cfg.keep_last,
                        trainer_state={"epoch": epoch, "batches_in_epoch": batches,
                                       "resamples": self.resamples.completed, "eval_loss_before": self.eval_before,
                                       "scheduler": self.scheduler.state_dict(), "skipped_steps": self.skipped,
                                       "engine": self.engine, "model_dtype": cfg.model_dtype, "config": to_dict(cfg)})
        self.saved_step = self.step

    def stopped(self) -> dict:
        self.checkpoint()
        self.accelerator.print(f"rosa-train: stopped by a signal at step {self.step}; checkpoint saved in "
                               f"{self.out / FOLDER}; relaunch with --resume auto")
        self.accelerator.end_training()
        return {"steps": self.step, "preempted": True}

    def diverged(self, what: str) -> DivergedError:
        kept = complete_checkpoints(self.out / FOLDER)
        where = (f"the last checkpoint ({kept[-1]}) is finite: continue from it with --resume auto, e.g. with "
                 "--resume-override \"[lr]\" and a lower --lr" if kept else "no checkpoint was written")
        return DivergedError(f"{what}; the run stopped without saving or exporting it ({where})")

    def evaluate(self) -> float:
        return evaluate(self.model, self.eval_loader, self.accelerator, self.module, self.cfg.loss_chunk_tokens)

    # ------------------------------------------------------------------ the loop

    def loop(self) -> dict | None:
        """Train to the last step; returns the stop summary if a signal ended it early."""
        from tqdm.auto import tqdm

        accelerator = self.accelerator
        bar = tqdm(total=self.total, initial=self.step, desc="rosa-train", dynamic_ncols=True,
                   disable=not accelerator.is_local_main_process)
        self.held.append(bar)  # closed before any error line is printed
        self.bar, self.losses, self.tokens, self.clock = bar, [], 0, time.perf_counter()
        self.model.train()
        collecting = gc.isenabled() and self.cfg.gc_every
        if collecting:
            gc.disable()  # collected together in _after_step; see TrainConfig.gc_every
        try:
            return self._epochs(accelerator, bar)
        finally:
            if collecting:
                gc.enable()

    def _epochs(self, accelerator, bar) -> dict | None:
        from accelerate import skip_first_batches

        while self.step < self.total:
            if hasattr(self.train_loader, "set_epoch"):
                self.train_loader.set_epoch(self.epoch)
            self.batches = self.skip  # micro-batches of this epoch consumed so far (a resume starts mid-epoch)
            loader = skip_first_batches(self.train_loader, self.skip) if self.skip else self.train_loader
            self.skip = 0
            step_losses, loss_bad = [], None
            for batch in loader:
                self.batches += 1
                loss, loss_bad, stop, bad = self._micro_batch(batch, loss_bad)
                step_losses.append(loss.detach())
                self.tokens += batch["input_ids"].numel()
                if not accelerator.sync_gradients:
                    continue
                if self._after_step(step_losses, bad, stop):
                    return self.stopped()
                step_losses, loss_bad = [], None
                if self.step >= self.total:
                    break
            else:
                self.epoch += 1
                continue
            if self.batches == len(self.train_loader):
                self.epoch, self.batches = self.epoch + 1, 0
        bar.close()  # the progress line ends before the closing lines
        return None

    def _micro_batch(self, batch: dict, loss_bad):
        """Forward, backward and (at the accumulation's end) the optimizer step of one micro-batch,
        skipped where any process saw a non-finite loss or gradient. Returns the loss, the running
        non-finite flag, whether a signal asks to stop, and what was bad (None, "loss", "gradient")."""
        cfg, accelerator, model = self.cfg, self.accelerator, self.model
        stop, bad_loss, bad_grad = False, False, False
        with accelerator.accumulate(model):
            ids, labels, positions = batch_inputs(batch)
            if cfg.loss_chunk_tokens:
                loss = loss_inside_forward(model, self.module, ids, chunk_tokens=cfg.loss_chunk_tokens, labels=labels,
                                           position_ids=positions)
            else:
                loss = model(input_ids=ids, labels=labels, position_ids=positions, use_cache=False).loss
            loss_bad = nonfinite(loss) if loss_bad is None else loss_bad | nonfinite(loss)
            if self.deepspeed:  # DeepSpeed updates inside backward: decide before it
                stop, bad_loss = agree(accelerator.device, self.watch.requested, loss_bad)
                if bad_loss:
                    self.metrics.log(self.step + 1, loss=None, nonfinite="loss")
                    raise self.diverged(f"non-finite loss at step {self.step + 1}")
            accelerator.backward(loss * self._target_share(labels) if accelerator.num_processes > 1 else loss)
            if accelerator.sync_gradients:  # whatever averaging the engine's wrapper leaves to the loop
                self.engine_ops.sync_gradients(self.module)
            if accelerator.sync_gradients and not self.deepspeed:
                stop, bad_loss, bad_grad = agree(accelerator.device, self.watch.requested, loss_bad,
                                                 nonfinite_grads(self.params))
            if not (bad_loss or bad_grad):
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss, loss_bad, stop, "loss" if bad_loss else "gradient" if bad_grad else None

    def _target_share(self, labels: torch.Tensor) -> float:
        """The processes times this process's share of the micro-batch's targets (a collective). The
        engines average gradients over processes; scaled so, every target weighs the same however
        the targets fall on the processes (padding, chat answers), as in one process with the whole
        batch. Exactly 1 where every process has as many targets, as with plain text."""
        local = int((labels[:, 1:] != IGNORE).sum())
        total = int(self.accelerator.reduce(torch.tensor(local, device=labels.device), "sum"))
        return local * self.accelerator.num_processes / max(total, 1)

    def _after_step(self, step_losses: list, bad: str | None, stop: bool) -> bool:
        """The bookkeeping of an optimizer step: learning rate, skipped steps, logging, resample,
        evaluation, checkpoint. Returns whether a signal asks the run to stop here."""
        cfg, accelerator = self.cfg, self.accelerator
        lr = self.torch_optimizer.param_groups[0]["lr"]  # the rate this step used
        self.scheduler.step()
        self.step += 1
        step = self.step
        self.bar.update(1)
        record = {}
        if bad:
            self.skipped += 1
            what = f"non-finite {bad} at step {step}"
            record.update(loss=None, nonfinite=bad)
            if self.skipped > cfg.max_skipped_steps:
                self.metrics.log(step, **record)
                allowed = (f" ({self.skipped - 1} skipped before, max_skipped_steps {cfg.max_skipped_steps})"
                           if cfg.max_skipped_steps else "")
                raise self.diverged(what + allowed)
            record["skipped_steps"] = self.skipped
            accelerator.print(f"rosa-train: {what}: step skipped ({self.skipped} of at most {cfg.max_skipped_steps})")
        else:
            self.losses.extend(step_losses)
        if (step % cfg.log_every == 0 or step == self.total) and self.losses:
            mean_loss = accelerator.reduce(torch.stack(self.losses).mean(), "mean").item()
            elapsed = time.perf_counter() - self.clock
            record.update(loss=mean_loss, lr=lr, tokens_per_s=self.tokens * accelerator.num_processes / elapsed)
            self.bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}")
            self.losses, self.tokens, self.clock = [], 0, time.perf_counter()
        if cfg.gc_every and step % cfg.gc_every == 0:
            gc.collect(1)
        resampled = self.resamples.after_step(step, self.total, self.model, self.optimizer)
        if resampled:
            record.update(resampled)
            self.clock = time.perf_counter()
        if cfg.eval_every and step % cfg.eval_every == 0 and step < self.total:
            record["eval_loss"] = self.evaluate()
            record["eval_ppl"] = perplexity(record["eval_loss"])
            self.clock = time.perf_counter()
        if record:
            self.metrics.log(step, **record)
        if ("resample_s" in record or "eval_loss" in record) and not stop:  # a long phase: ask again
            stop = self.watch.should_stop(accelerator.device)
        if cfg.save_every and (step % cfg.save_every == 0 or step == self.total):
            self.checkpoint()
        return stop

    # ------------------------------------------------------------------ the end

    def finish(self) -> dict:
        """Evaluate, export the merged model and write the summary; each phase may be cut short by a
        signal, which then leaves the checkpoint of this step."""
        cfg, accelerator, step = self.cfg, self.accelerator, self.step
        if self.watch.should_stop(accelerator.device):
            return self.stopped()
        eval_after = self.evaluate()
        self.metrics.log(step, eval_loss=eval_after, eval_ppl=perplexity(eval_after))
        accelerator.print(f"held-out perplexity after {step} steps and {self.resamples.completed} resamples: "
                          f"{perplexity(eval_after):.2f} (before: {perplexity(self.eval_before):.2f})")
        if self.watch.should_stop(accelerator.device):
            return self.stopped()
        if not math.isfinite(eval_after):
            raise self.diverged(f"the held-out loss after step {step} is {eval_after}")
        summary = {"steps": step, "resamples": self.resamples.completed, "skipped_steps": self.skipped,
                   "eval_loss_before": self.eval_before, "eval_loss_after": eval_after,
                   "eval_ppl_before": perplexity(self.eval_before), "eval_ppl_after": perplexity(eval_after), "merged": None}
        if cfg.save_merged:
            try:
                check_layers(self.layers, "exporting the merged model")
            except DivergedError as err:
                raise self.diverged(str(err)) from None
            accelerator.wait_for_everyone()
            folder = save_merged(self.module, self.tokenizer, self.out / "merged", DTYPES[cfg.model_dtype])
            if folder is not None:
                summary["merged"] = str(folder)
                accelerator.print(f"merged model (the original architecture, loadable with plain transformers): "
                                  f"{folder}")
        if accelerator.is_main_process:
            if self.deepspeed:
                summary["zero3_fast_leaf_fetch"] = zero3_fast_leaf_fetch(self.model)
            summary.update(distributed_type=accelerator.distributed_type.value, engine=self.engine,
                           compiled_layers=self.compiled, replicated_factors=self.replicated_factors,
                           num_processes=accelerator.num_processes,
                           world_size=dist.get_world_size() if dist.is_initialized() else 1)
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if self.watch.should_stop(accelerator.device):
            return self.stopped()
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return summary

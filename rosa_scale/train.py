"""`rosa-train`: fine-tune a causal LM with ROSA through accelerate (one process, DDP; CPU or GPU).

With no arguments it runs the built-in offline demo: SmolLM2-135M-Instruct on the local
Python's standard-library documentation. Every config key is also a command-line option
(``--lr 1e-3``, ``--rosa.rank 8``); ``--config run.yaml`` loads a file first.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import typing
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from . import launcher_link
from .checkpoint import (FOLDER, complete_checkpoints, find_checkpoint, load_checkpoint, read_trainer_state,
                         remove_leftovers, save_checkpoint)
from .chunked_loss import check_chunkable, loss_inside_forward
from .cli import Parser
from .config import ConfigError, TrainConfig, cli_fields, load_config, to_dict
from .config_drift import check_resume_config
from .data import DataError, build_datasets
from .engines import engine_for
from .export import save_merged
from .guard import DIVERGED_EXIT, DivergedError, agree, check_layers, nonfinite, nonfinite_grads
from .loading import DTYPES, load_tokenizer, resolve_model_path
from .metrics import MetricsWriter
from .model import adapter_parameters, rosa_layers, rosa_state
from .optimizers import build_optimizer
from .preemption import RESUMABLE_EXIT, PreemptionWatch
from .quant import QuantRosaLinear, parameter_count, quant_type_of
from .run_lock import OutputDirBusy, OutputDirLock
from .run_model import prepare_model, refuse_quantized_engine, zero3_fast_leaf_fetch
from .resample import resample
from .schedule import lr_factor, resample_part
from .trackers import check_installed, flat_config, tracker_names

# Config, data and model errors subclass ValueError, as do invalid ROSA settings for a model
# (rank too large, unknown target module). ROSA_SCALE_DEBUG=1 shows the traceback instead.
USER_ERRORS = (ValueError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rosa-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file of config keys (command-line options override it)")
    defaults = to_dict(TrainConfig())
    for key, tp, doc in cli_fields():
        node = defaults
        for part in key.split("."):
            node = node[part]
        parser.add_argument("--" + key.replace("_", "-"), dest=key, default=argparse.SUPPRESS,
                            metavar="VALUE", help=f"{doc} [default: {node}]" if doc else f"[default: {node}]")
    return parser


def _is_plain_str(tp) -> bool:
    args = typing.get_args(tp)
    return tp is str or (typing.get_origin(tp) is typing.Union and set(args) == {str, type(None)})


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Command line -> validated TrainConfig; option values are read as YAML scalars/lists."""
    args = vars(build_parser().parse_args(argv))
    path = args.pop("config", None)
    types_ = {key: tp for key, tp, _ in cli_fields()}
    overrides = {}
    for key, raw in args.items():
        try:
            overrides[key] = raw if _is_plain_str(types_[key]) else yaml.safe_load(raw)
        except yaml.YAMLError:
            overrides[key] = raw
    return load_config(path, overrides)


def _batch(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
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
        ids, labels, positions = _batch(batch)
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


def _resample_interval(cfg: TrainConfig, steps_per_epoch: int) -> int | None:
    every = steps_per_epoch if cfg.resample_every == "epoch" else cfg.resample_every
    if every and cfg.resample_stagger > every:
        raise ConfigError(f"config key 'resample_stagger' ({cfg.resample_stagger}) must be at most the "
                          f"{every} steps between resamples")
    return every


def _from_main(value):
    """Rank 0's ``value`` on every rank (a collective when distributed)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _claim_output_dir(out: Path, accelerator) -> OutputDirLock | None:
    """Rank 0 takes the output directory's lock; every rank raises if it could not."""
    lock, message = None, None
    if accelerator.is_main_process:
        lock = OutputDirLock(out)
        try:
            note = lock.acquire()
            if note:
                print(f"rosa-train: {note}", file=sys.stderr)
        except (OutputDirBusy, OSError) as err:
            lock, message = None, str(err)
    message = _from_main(message)
    if message:
        if lock is not None:
            lock.release()
        raise OutputDirBusy(message)
    return lock


def _clear_previous_run(out: Path) -> None:
    """``overwrite_output_dir``: what another run left here goes before this one writes anything."""
    for name in (FOLDER, "tensorboard", "merged"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("metrics.jsonl", "summary.json"):
        (out / name).unlink(missing_ok=True)


def _base_kind(layers) -> str:
    """What the start line says of a quantized base, e.g. `` (ROSA targets nf4, frozen)``."""
    kinds = sorted({quant_type_of(layer.base) for layer in layers.values() if isinstance(layer, QuantRosaLinear)})
    return f" (ROSA targets {'/'.join(kinds)}, frozen)" if kinds else ""


def _apply_overrides(overridden: list[str], cfg: TrainConfig, optimizer, scheduler) -> None:
    """Overridden optimizer settings take effect although the checkpoint restored the old ones."""
    if "lr" in overridden:
        scheduler.base_lrs = [cfg.lr for _ in scheduler.base_lrs]
        for group, factor in zip(optimizer.param_groups, [lam(scheduler.last_epoch) for lam in scheduler.lr_lambdas]):
            group["initial_lr"], group["lr"] = cfg.lr, cfg.lr * factor
    if "weight_decay" in overridden:
        for group in optimizer.param_groups:
            group["weight_decay"] = cfg.weight_decay


def _what_to_continue(cfg: TrainConfig, out: Path) -> tuple[Path | None, dict | None, list[str]]:
    """The checkpoint this run continues from (or None), its trainer state, and the overridden config
    keys, checked before any work: the same settings or ones named as overrides, and no fresh run over
    another run's checkpoints."""
    resume_from = find_checkpoint(cfg.resume, out) if cfg.resume else None
    saved = read_trainer_state(resume_from) if resume_from is not None else None
    overridden = check_resume_config(saved.get("config") if saved else None, cfg, str(resume_from))
    previous = complete_checkpoints(out / FOLDER)
    if resume_from is None and previous and not cfg.overwrite_output_dir:
        raise ConfigError(f"output_dir {out} holds another run's checkpoints (newest: {previous[-1].name}): continue "
                          "it with --resume auto, start afresh with --overwrite-output-dir true (deletes them), or "
                          "choose another --output-dir")
    return resume_from, saved, overridden


def train(cfg: TrainConfig) -> dict:
    """Run one fine-tune; returns the summary (eval before/after, merged model path)."""
    watch = PreemptionWatch()  # from the start: a signal during set-up is honoured at the first check
    held: list = []  # the output directory's lock and the metrics file, closed however the run ends
    try:
        return _train(cfg, watch, held)
    finally:
        watch.close()
        for thing in reversed(held):
            thing.close()


def _train(cfg: TrainConfig, watch: PreemptionWatch, held: list) -> dict:
    """The run itself: set-up, checks that refuse before anything is written, the loop, the end."""
    from accelerate import Accelerator
    from accelerate import skip_first_batches
    from accelerate.utils import DataLoaderConfiguration, DistributedType, InitProcessGroupKwargs, set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    # Without a GPU, accelerate runs torchrun's processes together only with cpu=True; DeepSpeed on
    # CPUs (DS_ACCELERATOR=cpu) must take the accelerator branch instead.
    cpu = not torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true"
    # A collective that waits longer than ROSA_DIST_TIMEOUT seconds (a dead node) ends the run.
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=int(os.environ.get("ROSA_DIST_TIMEOUT", "1800"))))
    trackers = tracker_names(cfg.report_to)
    check_installed(trackers)
    others = [t for t in trackers if t != "tensorboard"]  # TensorBoard is MetricsWriter's own
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision, cpu=cpu,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
                              kwargs_handlers=[timeout], log_with=others or None, project_dir=cfg.output_dir)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:  # accelerate would silently train unconnected copies
        raise ConfigError(f"{launched} processes were launched but accelerate sees {accelerator.num_processes}: "
                          "check the launcher and the accelerate config")
    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    say = accelerator.print
    accelerate_fsdp = accelerator.distributed_type == DistributedType.FSDP
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed and accelerator.state.deepspeed_plugin.zero_stage != 3:
        raise ConfigError(f"DeepSpeed ZeRO stage {accelerator.state.deepspeed_plugin.zero_stage} is not supported: "
                          "use stage 3 (configs/deepspeed/zero3.json), FSDP2 or DDP")
    if deepspeed and cfg.max_skipped_steps:
        raise ConfigError("config key 'max_skipped_steps' must be 0 under DeepSpeed ZeRO-3 (it updates the weights "
                          "inside backward, before a step could be skipped)")
    refuse_quantized_engine(cfg, accelerate_fsdp, deepspeed)
    lock = _claim_output_dir(out, accelerator)
    if lock is not None:
        held.append(lock)

    resume_from, saved, overridden = _what_to_continue(cfg, out)

    with accelerator.main_process_first():  # the main process builds caches, the others reuse them
        model_path = resolve_model_path(cfg.model)
        tokenizer = load_tokenizer(model_path)
        train_set, eval_set = build_datasets(cfg, tokenizer, model_path)
    prepared = prepare_model(cfg, accelerator, model_path, accelerate_fsdp=accelerate_fsdp, deepspeed=deepspeed)
    model, compiled, own_fsdp = prepared.model, prepared.compiled, prepared.own_fsdp
    params = adapter_parameters(model)
    optimizer = torch_optimizer = build_optimizer(cfg.optimizer, params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(cfg.seed))
    eval_loader = DataLoader(eval_set, batch_size=cfg.batch_size)
    if own_fsdp:  # already sharded: accelerate must not wrap it again (DDP)
        optimizer, train_loader, eval_loader = accelerator.prepare(optimizer, train_loader, eval_loader)
    else:
        model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    if deepspeed:
        from .safe_load import protect_deepspeed_engine

        protect_deepspeed_engine(model)  # its checkpoints are read without running code
    if prepared.split_after_prepare:  # on the shards, spread over ranks; DeepSpeed may hold optimizer state already
        resample(model, optimizer, index=0)
    module = model if own_fsdp else accelerator.unwrap_model(model)  # the plain model, for ROSA and saving
    layers = rosa_layers(module)
    engine = engine_for(module).name
    if cfg.loss_chunk_tokens:
        check_chunkable(module)

    steps_per_epoch = len(train_loader) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise DataError(f"{len(train_set)} training blocks are too few for one optimizer step of "
                        f"batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x {accelerator.num_processes} processes")
    total = cfg.max_steps or max(1, math.floor(cfg.epochs * steps_per_epoch))
    every = _resample_interval(cfg, steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # on the torch optimizer: DeepSpeed steps its groups
        torch_optimizer,
        lambda s: lr_factor(s, total_steps=total, warmup_steps=cfg.warmup_steps, schedule=cfg.lr_schedule,
                            resample_every=every, rewarm_steps=cfg.rewarm_steps))

    start_step, start_epoch, skip, resamples, eval_before, skipped = 0, 0, 0, 0, None, 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, model=model, module=module, optimizer=torch_optimizer, state=saved,
                                expect={"engine": engine, "world_size": accelerator.num_processes})
        scheduler.load_state_dict(state["scheduler"])
        _apply_overrides(overridden, cfg, torch_optimizer, scheduler)
        start_step, start_epoch, skip = state["step"], state["epoch"], state["batches_in_epoch"]
        resamples, eval_before, skipped = state["resamples"], state["eval_loss_before"], state.get("skipped_steps", 0)
    if accelerator.is_main_process:
        if resume_from is None and cfg.overwrite_output_dir:
            _clear_previous_run(out)
        remove_leftovers(out / FOLDER)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    trainable = sum(parameter_count(p) for p in params)
    everything = sum(parameter_count(p) for p in model.parameters())
    nodes = accelerator.num_processes // int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    memory = (f", {torch.cuda.get_device_properties(accelerator.device).total_memory / 2**30:.0f} GiB per GPU"
              if accelerator.device.type == "cuda" else "")
    say(f"rosa-train: {accelerator.distributed_type.value}, {accelerator.num_processes} processes on {nodes} node(s), "
        f"engine {engine}, rank 0 on {accelerator.device}{memory}; weights {cfg.model_dtype}{_base_kind(layers)}, compute "
        f"{cfg.mixed_precision if cfg.mixed_precision != 'no' else cfg.model_dtype}; "
        f"{len(train_set)} train / {len(eval_set)} eval blocks of {cfg.block_size} tokens; "
        f"trainable {trainable:,} of {everything:,} params ({100 * trainable / everything:.2f}%); "
        f"{total} steps, resample every {every or 'never'}"
        f"{f' (over {cfg.resample_stagger} steps)' if every and cfg.resample_stagger > 1 else ''}"
        f"{f'; {compiled} layers compiled' if compiled else ''}")
    if overridden:
        say(f"rosa-train: resuming with new values of {', '.join(overridden)} (resume_override)")

    if others:
        accelerator.init_trackers("rosa-train", config=flat_config(to_dict(cfg)))
    metrics = MetricsWriter(out, enabled=accelerator.is_main_process,
                            resumed_at=None if resume_from is None else start_step,
                            tensorboard="tensorboard" in trackers, forward=accelerator.log if others else None)
    held.append(metrics)
    if resume_from is None:
        eval_before = evaluate(model, eval_loader, accelerator, module, cfg.loss_chunk_tokens)
        metrics.log(0, eval_loss=eval_before, eval_ppl=_exp(eval_before))
        say(f"held-out perplexity before: {_exp(eval_before):.2f}")
    else:
        say(f"resumed from {resume_from} at step {start_step} (resample {rosa_state(module).split_index})")

    def checkpoint(step: int, epoch: int, batches: int) -> None:
        """Save (unless this step's checkpoint exists already); never with non-finite factors."""
        if saved_step[0] == step:  # saved at this step already, or resumed from it here
            return
        try:
            check_layers(layers, f"saving the checkpoint of step {step}")
        except DivergedError as err:
            raise diverged(str(err)) from None
        if batches == len(train_loader):  # the epoch is done: resume at the next one
            epoch, batches = epoch + 1, 0
        save_checkpoint(out, step, model=model, module=module, optimizer=torch_optimizer, tokenizer=tokenizer,
                        keep_last=cfg.keep_last,
                        trainer_state={"epoch": epoch, "batches_in_epoch": batches, "resamples": resamples,
                                       "eval_loss_before": eval_before, "scheduler": scheduler.state_dict(),
                                       "skipped_steps": skipped, "engine": engine, "model_dtype": cfg.model_dtype,
                                       "config": to_dict(cfg)})
        saved_step[0] = step

    def stopped(step: int, epoch: int, batches: int) -> dict:
        checkpoint(step, epoch, batches)
        say(f"rosa-train: stopped by a signal at step {step}; checkpoint saved in {out / FOLDER}; "
            "relaunch with --resume auto")
        accelerator.end_training()
        return {"steps": step, "preempted": True}

    def diverged(what: str) -> DivergedError:
        kept = complete_checkpoints(out / FOLDER)
        where = (f"the last checkpoint ({kept[-1]}) is finite: continue from it with --resume auto, e.g. with "
                 "--resume-override \"[lr]\" and a lower --lr" if kept else "no checkpoint was written")
        return DivergedError(f"{what}; the run stopped without saving or exporting it ({where})")

    saved_step = [start_step if resume_from is not None and resume_from.parent == out / FOLDER else None]
    step, epoch, losses, tokens, clock = start_step, start_epoch, [], 0, time.perf_counter()
    batches = skip
    if watch.should_stop(accelerator.device):
        return stopped(step, epoch, batches)
    bar = tqdm(total=total, initial=start_step, desc="rosa-train", disable=not accelerator.is_local_main_process,
               dynamic_ncols=True)
    held.append(bar)  # closed before any error line is printed
    model.train()
    while step < total:
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        batches = skip  # micro-batches of this epoch consumed so far (a resume starts mid-epoch)
        loader = skip_first_batches(train_loader, skip) if skip else train_loader
        skip = 0
        step_losses, loss_bad, stop, bad_loss, bad_grad = [], None, False, False, False
        for batch in loader:
            batches += 1
            with accelerator.accumulate(model):
                ids, labels, positions = _batch(batch)
                if cfg.loss_chunk_tokens:
                    loss = loss_inside_forward(model, module, ids, chunk_tokens=cfg.loss_chunk_tokens, labels=labels,
                                               position_ids=positions)
                else:
                    loss = model(input_ids=ids, labels=labels, position_ids=positions, use_cache=False).loss
                loss_bad = nonfinite(loss) if loss_bad is None else loss_bad | nonfinite(loss)
                if deepspeed:  # DeepSpeed updates inside backward: decide before it
                    stop, bad_loss = agree(accelerator.device, watch.requested, loss_bad)
                    if bad_loss:
                        metrics.log(step + 1, loss=None, nonfinite="loss")
                        raise diverged(f"non-finite loss at step {step + 1}")
                accelerator.backward(loss)
                if accelerator.sync_gradients and not deepspeed:
                    stop, bad_loss, bad_grad = agree(accelerator.device, watch.requested, loss_bad,
                                                     nonfinite_grads(params))
                if not (bad_loss or bad_grad):
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_losses.append(loss.detach())
            tokens += ids.numel()
            if not accelerator.sync_gradients:
                continue
            lr = torch_optimizer.param_groups[0]["lr"]  # the rate this step used
            scheduler.step()
            step += 1
            bar.update(1)
            record = {}
            if bad_loss or bad_grad:
                skipped += 1
                what = f"non-finite {'loss' if bad_loss else 'gradient'} at step {step}"
                record.update(loss=None, nonfinite="loss" if bad_loss else "gradient")
                if skipped > cfg.max_skipped_steps:
                    metrics.log(step, **record)
                    allowed = f" ({skipped - 1} skipped before, max_skipped_steps {cfg.max_skipped_steps})" \
                        if cfg.max_skipped_steps else ""
                    raise diverged(what + allowed)
                record["skipped_steps"] = skipped
                say(f"rosa-train: {what}: step skipped ({skipped} of at most {cfg.max_skipped_steps})")
            else:
                losses.extend(step_losses)
            step_losses, loss_bad, bad_loss, bad_grad = [], None, False, False
            if (step % cfg.log_every == 0 or step == total) and losses:
                mean_loss = accelerator.reduce(torch.stack(losses).mean(), "mean").item()
                elapsed = time.perf_counter() - clock
                record.update(loss=mean_loss, lr=lr, tokens_per_s=tokens * accelerator.num_processes / elapsed)
                bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}")
                losses, tokens, clock = [], 0, time.perf_counter()
            part = resample_part(step, every, cfg.resample_stagger, total)
            if part is not None:
                stagger = (part, cfg.resample_stagger) if cfg.resample_stagger > 1 else None
                record["resample_s"] = resample(model, optimizer if cfg.reset_optimizer else None, part=stagger)
                if stagger:
                    record["resample_part"] = part + 1
                if part == cfg.resample_stagger - 1:
                    resamples += 1
                clock = time.perf_counter()
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                record["eval_loss"] = evaluate(model, eval_loader, accelerator, module, cfg.loss_chunk_tokens)
                record["eval_ppl"] = _exp(record["eval_loss"])
                clock = time.perf_counter()
            if record:
                metrics.log(step, **record)
            if ("resample_s" in record or "eval_loss" in record) and not stop:  # a long phase: ask again
                stop = watch.should_stop(accelerator.device)
            if cfg.save_every and (step % cfg.save_every == 0 or step == total):
                checkpoint(step, epoch, batches)
            if stop:
                return stopped(step, epoch, batches)
            if step >= total:
                break
        else:
            epoch += 1
            continue
        if batches == len(train_loader):
            epoch, batches = epoch + 1, 0
    bar.close()  # the progress line ends before the closing lines

    # The end: each phase may be cut short by a signal, which then leaves the checkpoint of this step.
    if watch.should_stop(accelerator.device):
        return stopped(step, epoch, batches)
    eval_after = evaluate(model, eval_loader, accelerator, module, cfg.loss_chunk_tokens)
    metrics.log(step, eval_loss=eval_after, eval_ppl=_exp(eval_after))
    say(f"held-out perplexity after {step} steps and {resamples} resamples: {_exp(eval_after):.2f} "
        f"(before: {_exp(eval_before):.2f})")
    if watch.should_stop(accelerator.device):
        return stopped(step, epoch, batches)
    if not math.isfinite(eval_after):
        raise diverged(f"the held-out loss after step {step} is {eval_after}")
    summary = {"steps": step, "resamples": resamples, "skipped_steps": skipped, "eval_loss_before": eval_before,
               "eval_loss_after": eval_after, "eval_ppl_before": _exp(eval_before), "eval_ppl_after": _exp(eval_after),
               "merged": None}
    if cfg.save_merged:
        try:
            check_layers(layers, "exporting the merged model")
        except DivergedError as err:
            raise diverged(str(err)) from None
        accelerator.wait_for_everyone()
        folder = save_merged(module, tokenizer, out / "merged", DTYPES[cfg.model_dtype])
        if folder is not None:
            summary["merged"] = str(folder)
            say(f"merged model (the original architecture, loadable with plain transformers): {folder}")
    if accelerator.is_main_process:
        if deepspeed:
            summary["zero3_fast_leaf_fetch"] = zero3_fast_leaf_fetch(model)
        summary.update(distributed_type=accelerator.distributed_type.value, engine=engine, compiled_layers=compiled,
                       num_processes=accelerator.num_processes,
                       world_size=dist.get_world_size() if dist.is_initialized() else 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if watch.should_stop(accelerator.device):
        return stopped(step, epoch, batches)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _exp(loss: float) -> float:
    """Perplexity; an overflow is inf, not an exception."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def _dry_run(argv: list[str]) -> int:
    """``--dry-run [--processes N] [--gpu-memory-gib G]``: the plan of the run the other options describe,
    from the model's config alone (``rosa_scale.memory_plan``); nothing is trained or written."""
    from .memory_plan import dry_run

    argv.remove("--dry-run")
    values = {"--processes": "1", "--gpu-memory-gib": "80"}
    for flag in values:
        if flag in argv:
            i = argv.index(flag)
            if i + 1 >= len(argv):
                raise ConfigError(f"{flag} needs a value")
            values[flag] = argv.pop(i + 1)
            argv.pop(i)
    try:
        processes, gpu_gib = int(values["--processes"]), float(values["--gpu-memory-gib"])
    except ValueError:
        raise ConfigError(f"--processes takes an integer and --gpu-memory-gib a number, got {values['--processes']!r} "
                          f"and {values['--gpu-memory-gib']!r}") from None
    if processes < 1 or gpu_gib <= 0:
        raise ConfigError("--processes must be >= 1 and --gpu-memory-gib > 0")
    print(dry_run(parse_config(argv), processes, gpu_gib))
    return 0


def main(argv: list[str] | None = None) -> int:
    prog = "rosa-train"
    launcher_link.register()
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        if "--dry-run" in argv:
            return _dry_run(argv)
        cfg = parse_config(argv)
        if train(cfg).get("preempted"):
            launcher_link.mark_resumable()
            return RESUMABLE_EXIT
    except USER_ERRORS as err:
        if os.environ.get("ROSA_SCALE_DEBUG"):
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except DivergedError as err:
        if os.environ.get("ROSA_SCALE_DEBUG"):
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return DIVERGED_EXIT
    except OSError as err:  # the machine, not the input: a full disk, a lost mount
        if os.environ.get("ROSA_SCALE_DEBUG"):
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

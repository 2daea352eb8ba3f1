"""`rosa-train`: fine-tune a causal LM with ROSA through accelerate (one process, DDP; CPU or GPU).

With no arguments it runs the built-in offline demo: SmolLM2-135M-Instruct on the local
Python's standard-library documentation. Every config key is also a command-line option
(``--lr 1e-3``, ``--rosa.rank 8``); ``--config run.yaml`` loads a file first.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import typing
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from . import launcher_link
from .checkpoint import FOLDER, complete_checkpoints, find_checkpoint, read_trainer_state, remove_leftovers
from .chunked_loss import check_chunkable
from .cli import Parser
from .config import ConfigError, TrainConfig, cli_fields, load_config, to_dict
from .config_drift import check_resume_config
from .data import DataError, build_datasets
from .guard import DIVERGED_EXIT, DivergedError
from .loading import load_tokenizer, resolve_model_path
from .metrics import MetricsWriter
from .model import adapter_parameters, rosa_state
from .optimizers import build_optimizer
from .preemption import RESUMABLE_EXIT, PreemptionWatch
from .quant import QuantRosaLinear, parameter_count, quant_type_of
from .run_lock import OutputDirBusy, OutputDirLock
from .run_model import prepare_model, refuse_quantized_engine
from .resample import resample
from .resample_schedule import ResampleSchedule
from .schedule import lr_factor
from .trackers import check_installed, flat_config, tracker_names
from .training_run import TrainingRun, perplexity

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
    """The run as a recipe: set-up (with every check that refuses before anything is written), the
    loop, the end. A signal is honoured at each phase's end with a checkpoint of that step."""
    run = _start(cfg, watch, held)
    if watch.should_stop(run.accelerator.device):
        return run.stopped()
    return run.loop() or run.finish()


def _accelerator(cfg: TrainConfig):
    """accelerate's Accelerator for this launch, with rosa-train's refusals of what it cannot run."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedType, InitProcessGroupKwargs

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
    accelerate_fsdp = accelerator.distributed_type == DistributedType.FSDP
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed and accelerator.state.deepspeed_plugin.zero_stage != 3:
        raise ConfigError(f"DeepSpeed ZeRO stage {accelerator.state.deepspeed_plugin.zero_stage} is not supported: "
                          "use stage 3 (configs/deepspeed/zero3.json), FSDP2 or DDP")
    if deepspeed and cfg.max_skipped_steps:
        raise ConfigError("config key 'max_skipped_steps' must be 0 under DeepSpeed ZeRO-3 (it updates the weights "
                          "inside backward, before a step could be skipped)")
    refuse_quantized_engine(cfg, accelerate_fsdp, deepspeed)
    return accelerator, trackers, others, accelerate_fsdp, deepspeed


def _start(cfg: TrainConfig, watch: PreemptionWatch, held: list) -> TrainingRun:
    """Everything before the first step: the processes, the output directory's lock, the checkpoint
    to continue from, data, model, optimizer, schedule, the start line and the first evaluation."""
    from accelerate.utils import set_seed

    accelerator, trackers, others, accelerate_fsdp, deepspeed = _accelerator(cfg)
    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    lock = _claim_output_dir(out, accelerator)
    if lock is not None:
        held.append(lock)
    resume_from, saved, overridden = _what_to_continue(cfg, out)

    with accelerator.main_process_first():  # the main process builds caches, the others reuse them
        model_path = resolve_model_path(cfg.model)
        tokenizer = load_tokenizer(model_path)
        train_set, eval_set = build_datasets(cfg, tokenizer, model_path)
    prepared = prepare_model(cfg, accelerator, model_path, accelerate_fsdp=accelerate_fsdp, deepspeed=deepspeed)
    model = prepared.model
    params = adapter_parameters(model)
    model, module, optimizer, torch_optimizer, train_loader, eval_loader = _prepare_for_engine(
        cfg, accelerator, prepared, params, train_set, eval_set, deepspeed=deepspeed)

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
    run = TrainingRun(cfg, accelerator, model, module, optimizer, torch_optimizer, scheduler, train_loader, eval_loader,
               tokenizer, watch, held, deepspeed=deepspeed, total=total,
               resamples=ResampleSchedule(every, stagger=cfg.resample_stagger, reset_optimizer=cfg.reset_optimizer),
               compiled=prepared.compiled)
    if resume_from is not None:
        run.restore(resume_from, saved, overridden)
    if accelerator.is_main_process:
        if resume_from is None and cfg.overwrite_output_dir:
            _clear_previous_run(out)
        remove_leftovers(out / FOLDER)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    _say_start(run, train_set, eval_set, params)
    if overridden:
        accelerator.print(f"rosa-train: resuming with new values of {', '.join(overridden)} (resume_override)")
    _open_metrics(run, out, trackers, others, resumed=resume_from is not None)
    if resume_from is None:
        run.eval_before = run.evaluate()
        run.metrics.log(0, eval_loss=run.eval_before, eval_ppl=perplexity(run.eval_before))
        accelerator.print(f"held-out perplexity before: {perplexity(run.eval_before):.2f}")
    else:
        accelerator.print(f"resumed from {resume_from} at step {run.step} (resample {rosa_state(module).split_index})")
    return run


def _prepare_for_engine(cfg: TrainConfig, accelerator, prepared, params, train_set, eval_set, *, deepspeed: bool):
    """Optimizer and data loaders, handed with the model to accelerate (the model only where it is not
    sharded already), then the first split where it waits for the shards. Returns the engine's model,
    the plain module (for ROSA and saving), the engine's and torch's optimizers and the loaders."""
    from torch.utils.data import DataLoader

    model = prepared.model
    optimizer = torch_optimizer = build_optimizer(cfg.optimizer, params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(cfg.seed))
    eval_loader = DataLoader(eval_set, batch_size=cfg.batch_size)
    if prepared.own_fsdp:  # already sharded: accelerate must not wrap it again (DDP)
        optimizer, train_loader, eval_loader = accelerator.prepare(optimizer, train_loader, eval_loader)
    else:
        model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    if deepspeed:
        from .safe_load import protect_deepspeed_engine

        protect_deepspeed_engine(model)  # its checkpoints are read without running code
    if prepared.split_after_prepare:  # on the shards, spread over ranks; DeepSpeed may hold optimizer state already
        resample(model, optimizer, index=0)
    module = model if prepared.own_fsdp else accelerator.unwrap_model(model)
    if cfg.loss_chunk_tokens:
        check_chunkable(module)
    return model, module, optimizer, torch_optimizer, train_loader, eval_loader


def _open_metrics(run: TrainingRun, out: Path, trackers, others, *, resumed: bool) -> None:
    """metrics.jsonl (appended to after a resume), TensorBoard and the other trackers, main process only."""
    cfg, accelerator = run.cfg, run.accelerator
    if others:
        accelerator.init_trackers("rosa-train", config=flat_config(to_dict(cfg)))
    run.metrics = MetricsWriter(out, enabled=accelerator.is_main_process, resumed_at=run.step if resumed else None,
                                tensorboard="tensorboard" in trackers, forward=accelerator.log if others else None)
    run.held.append(run.metrics)


def _say_start(run: TrainingRun, train_set, eval_set, params) -> None:
    """The start line: where the run runs, on what, and what it will do."""
    cfg, accelerator = run.cfg, run.accelerator
    trainable = sum(parameter_count(p) for p in params)
    everything = sum(parameter_count(p) for p in run.model.parameters())
    nodes = accelerator.num_processes // int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    memory = (f", {torch.cuda.get_device_properties(accelerator.device).total_memory / 2**30:.0f} GiB per GPU"
              if accelerator.device.type == "cuda" else "")
    every = run.resamples.every
    accelerator.print(
        f"rosa-train: {accelerator.distributed_type.value}, {accelerator.num_processes} processes on {nodes} node(s), "
        f"engine {run.engine}, rank 0 on {accelerator.device}{memory}; weights {cfg.model_dtype}{_base_kind(run.layers)}, "
        f"compute {cfg.mixed_precision if cfg.mixed_precision != 'no' else cfg.model_dtype}; "
        f"{len(train_set)} train / {len(eval_set)} eval blocks of {cfg.block_size} tokens; "
        f"trainable {trainable:,} of {everything:,} params ({100 * trainable / everything:.2f}%); "
        f"{run.total} steps, resample every {every or 'never'}"
        f"{f' (over {cfg.resample_stagger} steps)' if every and cfg.resample_stagger > 1 else ''}"
        f"{f'; {run.compiled} layers compiled' if run.compiled else ''}")


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

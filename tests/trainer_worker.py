"""transformers' Trainer with RosaCallback in one process, or in each of 2 torchrun processes (gloo)
under the Trainer's DDP, accelerate's FSDP2 or DeepSpeed ZeRO-3 (``--engine``); rank 0 saves what
test_callbacks compares (``--out``): resample steps, whether the factors' optimizer state was empty
right after each step, the losses, the trained model's logits and its full factors on every rank."""
import argparse
import importlib
import os
import sys

import torch
import torch.distributed as dist

DS_CONFIG = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
             "gradient_clipping": "auto", "steps_per_print": 10**9}


def _full(p: torch.Tensor) -> torch.Tensor:
    """A factor whole, however the engine stores it (collective under FSDP2 and ZeRO-3)."""
    if hasattr(p, "ds_id"):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(p)
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _state_is_empty(optimizer, params) -> bool:
    """Whether the optimizer holds no moments for ``params`` (ZeRO-3: zero moments; collective)."""
    if params and hasattr(params[0], "ds_id"):
        from deepspeed.utils import safe_get_full_optimizer_state

        moments = [safe_get_full_optimizer_state(p, "exp_avg") for p in params]
        return all(m is None or not m.any() for m in moments)
    inner = getattr(optimizer, "optimizer", optimizer)
    return all(p not in inner.state for p in params)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--engine", choices=["one", "ddp", "fsdp2", "zero3"], default="one")
    args = p.parse_args()
    if args.engine in ("fsdp2", "zero3"):
        importlib.import_module("tests.accelerate_cpu")  # accelerate's multi-process branch over gloo on CPUs

    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from rosa_scale import RosaConfig, adapter_parameters, apply_rosa
    from rosa_scale.callbacks import RosaCallback
    from tests.test_callbacks import IDS, _Blocks
    from tests.tiny import tiny_llama, tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    model = apply_rosa(tiny_llama(len(tokenizer)), RosaConfig(rank=4))
    rosa = RosaCallback(resample_every=3, merged_dir=args.out + ".merged")
    empty_after: dict[int, bool] = {}

    class Probe(TrainerCallback):  # runs after RosaCallback at each step's end
        def on_step_end(self, args_, state, control, model=None, optimizer=None, **kwargs):
            empty_after[state.global_step] = _state_is_empty(optimizer, adapter_parameters(model))

    engine = {"fsdp2": dict(fsdp="full_shard auto_wrap",
                            fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}),
              "zero3": dict(deepspeed=DS_CONFIG)}.get(args.engine, {})
    trainer = Trainer(model=model, train_dataset=_Blocks(tokenizer), processing_class=tokenizer,
                      data_collator=default_data_collator, callbacks=[rosa, Probe()],
                      args=TrainingArguments(output_dir=args.out + ".run", max_steps=8, learning_rate=1e-2,
                                             per_device_train_batch_size=args.batch, lr_scheduler_type="constant",
                                             save_strategy="no", report_to=[], use_cpu=args.engine in ("one", "ddp"),
                                             disable_tqdm=True, seed=0, data_seed=0, logging_steps=1, **engine))
    trainer.train()
    module = trainer.model
    from rosa_scale.engines import engine_for

    engine_name = engine_for(module).name
    factors = torch.cat([_full(p).detach().flatten() for p in adapter_parameters(module)])
    world = dist.get_world_size() if dist.is_initialized() else 1
    gathered = [torch.zeros_like(factors) for _ in range(world)]
    if world > 1:
        dist.all_gather(gathered, factors)
    else:
        gathered = [factors]
    trainer.model_wrapped.eval()  # DeepSpeed's engine returns None here, not itself
    with torch.no_grad():
        logits = trainer.model_wrapped(input_ids=IDS).logits  # collective when sharded
    if int(os.environ.get("RANK", 0)) == 0:
        torch.save({"events": [s for s, _ in rosa.events], "world": world, "logits": logits,
                    "factors_per_rank": gathered, "empty_after": empty_after, "engine": engine_name,
                    "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r]}, args.out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()  # else the ranks linger at exit (about 30 s under DeepSpeed)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # DeepSpeed's threads still held some exits back ~30 s: the results are written


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

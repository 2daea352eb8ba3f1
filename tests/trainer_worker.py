"""transformers' Trainer with RosaCallback in one process, or in each of 2 torchrun processes (DDP over
gloo); rank 0 saves what test_callbacks compares (``--out``)."""
import argparse
import os

import torch
import torch.distributed as dist


def main() -> None:
    from transformers import Trainer, TrainingArguments, default_data_collator

    from rosa_scale import RosaConfig, adapter_parameters, apply_rosa
    from rosa_scale.callbacks import RosaCallback
    from tests.test_callbacks import IDS, _Blocks
    from tests.tiny import tiny_llama, tiny_tokenizer

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, required=True)
    args = p.parse_args()
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    model = apply_rosa(tiny_llama(len(tokenizer)), RosaConfig(rank=4))
    rosa = RosaCallback(resample_every=3, merged_dir=args.out + ".merged")
    trainer = Trainer(model=model, train_dataset=_Blocks(tokenizer), processing_class=tokenizer,
                      data_collator=default_data_collator, callbacks=[rosa],
                      args=TrainingArguments(output_dir=args.out + ".run", max_steps=8, learning_rate=1e-2,
                                             per_device_train_batch_size=args.batch, lr_scheduler_type="constant",
                                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                                             seed=0, data_seed=0, logging_steps=1))
    trainer.train()
    factors = torch.cat([p.detach().flatten() for p in adapter_parameters(model)])
    world = dist.get_world_size() if dist.is_initialized() else 1
    gathered = [torch.zeros_like(factors) for _ in range(world)]
    if world > 1:
        dist.all_gather(gathered, factors)
    else:
        gathered = [factors]
    if int(os.environ.get("RANK", 0)) == 0:
        with torch.no_grad():
            logits = model(IDS).logits
        torch.save({"events": [s for s, _ in rosa.events], "world": world, "logits": logits,
                    "factors_per_rank": gathered,
                    "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r]}, args.out)


if __name__ == "__main__":
    main()

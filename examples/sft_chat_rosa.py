"""ROSA in TRL's SFTTrainer on chat data, the loss on the assistant's answers only.

    python examples/sft_chat_rosa.py                      # the built-in SmolLM2, a small built-in chat set
    python examples/sft_chat_rosa.py --model PATH --dataset chats.jsonl   # rows {"prompt": [...], "completion": [...]}
"""
import argparse

import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from rosa_scale import RosaConfig, apply_rosa
from rosa_scale.callbacks import RosaCallback
from rosa_scale.loading import resolve_model_path


def tiny_chats(n: int = 96) -> Dataset:
    """Conversations to learn offline: a user asks for the successor of a number."""
    rows = [{"prompt": [{"role": "user", "content": f"What number comes after {i}?"}],
             "completion": [{"role": "assistant", "content": f"{i + 1}."}]} for i in range(n)]
    return Dataset.from_list(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--dataset", default=None, help="JSONL of conversational prompt/completion rows")
    p.add_argument("--output-dir", default="runs/sft-rosa")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()

    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = apply_rosa(AutoModelForCausalLM.from_pretrained(path), RosaConfig(rank=args.rank))
    data = load_dataset("json", data_files=args.dataset)["train"] if args.dataset else tiny_chats()
    trainer = SFTTrainer(
        model=model, train_dataset=data, processing_class=tokenizer,
        args=SFTConfig(output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=8,
                       learning_rate=1e-3, logging_steps=5, save_strategy="no", report_to=[],
                       completion_only_loss=True, max_length=128, bf16=torch.cuda.is_available()),
        callbacks=[RosaCallback(resample_every=max(1, args.max_steps // 3), merged_dir=f"{args.output_dir}/merged")])
    trainer.train()
    print(f"merged model (plain transformers): {args.output_dir}/merged")


if __name__ == "__main__":
    main()

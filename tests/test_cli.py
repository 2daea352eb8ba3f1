"""Bad input to rosa-train: one clear error line, a non-zero exit, nothing written. Run in this
process (``main``, as the console script calls it), so each case costs no interpreter start."""
import subprocess

import pytest

from rosa_scale import train as train_mod


@pytest.fixture
def run(capsys, monkeypatch):
    """rosa-train's ``main`` on ``args`` in folder ``cwd``, as a finished process (argparse's exit included)."""
    def _run(args, cwd):
        monkeypatch.chdir(cwd)
        try:
            code = train_mod.main(args)
        except SystemExit as stop:
            code = stop.code
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)
    return _run


def _assert_one_error(proc, fragment):
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rosa-train: error:")]
    assert len(errors) == 1, proc.stderr
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in proc.stderr


@pytest.fixture
def base_args(tiny_model_dir, tiny_data, tmp_path):
    return ["--model", str(tiny_model_dir), "--dataset", str(tiny_data["train"]), "--block-size", "32",
            "--max-steps", "2", "--output-dir", str(tmp_path / "out")]


def test_unknown_config_key_in_yaml(run, tmp_path, base_args):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 0.001\nresample_evry: 10\n")
    proc = run(["--config", str(cfg), *base_args], tmp_path)
    _assert_one_error(proc, "unknown config key 'resample_evry' (did you mean 'resample_every'?)")
    assert not (tmp_path / "out").exists()


def test_unknown_nested_key_and_bad_type(run, tmp_path, base_args):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("rosa:\n  rnk: 4\n")
    _assert_one_error(run(["--config", str(cfg), *base_args], tmp_path), "unknown config key 'rosa.rnk'")
    _assert_one_error(run([*base_args, "--lr", "fast"], tmp_path), "config key 'lr' must be float")
    _assert_one_error(run([*base_args, "--rosa.method", "lu"], tmp_path), "config key 'rosa.method' must be")


def test_unknown_option(run, tmp_path, base_args):
    proc = run([*base_args, "--learning-rate", "1"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--learning-rate" in proc.stderr


def test_rank_too_large(run, tmp_path, base_args):
    _assert_one_error(run([*base_args, "--rosa.rank", "100"], tmp_path), "rank 100 is too large")
    assert not (tmp_path / "out").exists()


def test_missing_data_path(run, tmp_path, base_args):
    args = [*base_args, "--dataset", str(tmp_path / "nope" / "train.jsonl")]
    _assert_one_error(run(args, tmp_path), "dataset path not found")


def test_missing_model_path(run, tmp_path, base_args):
    _assert_one_error(run([*base_args, "--model", str(tmp_path / "no-model")], tmp_path), "model path not found")


def test_unknown_target_module(run, tmp_path, base_args):
    proc = run([*base_args, "--rosa.target-modules", "[qkv_proj]"], tmp_path)
    _assert_one_error(proc, "target module 'qkv_proj' not found")


def test_wrong_text_field(run, tmp_path, base_args):
    _assert_one_error(run([*base_args, "--text-field", "body"], tmp_path), "text field 'body' not in the dataset")

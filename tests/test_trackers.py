"""report_to: accelerate's trackers get every record (resamples included); bad names are one line."""
import pytest

import rosa_scale.trackers as trackers
from rosa_scale.config import ConfigError


def test_names_and_refusals(monkeypatch):
    assert trackers.tracker_names("none") == [] and trackers.tracker_names("wandb, tensorboard") == ["wandb", "tensorboard"]
    with pytest.raises(ConfigError, match="unknown tracker 'neptune'"):
        trackers.tracker_names("tensorboard,neptune")
    monkeypatch.setattr(trackers, "is_installed", lambda name: name != "wandb")
    assert trackers.tracker_names("auto") == ["tensorboard"]
    monkeypatch.setattr(trackers, "is_installed", lambda name: False)
    assert trackers.tracker_names("auto") == []  # TensorBoard only where it is installed, as before
    monkeypatch.setattr(trackers, "is_installed", lambda name: name != "wandb")
    with pytest.raises(ConfigError, match=r"names wandb, which is not installed \(pip install wandb\)"):
        trackers.check_installed(["tensorboard", "wandb"])


def test_records_reach_the_tracker(monkeypatch, tiny_model_dir, tiny_data, tmp_path):
    """A run with report_to mlflow (stood in for: accelerate's log and init_trackers recorded): the
    tracker gets the flat config and every record, the resample seconds at the resample step; no
    TensorBoard folder, since it was not named."""
    import accelerate

    from rosa_scale.train import main

    seen, started = [], {}
    monkeypatch.setattr(trackers, "is_installed", lambda name: True)
    monkeypatch.setattr(accelerate.Accelerator, "init_trackers",
                        lambda self, project, config=None, init_kwargs=None: started.update(project=project, **config))
    monkeypatch.setattr(accelerate.Accelerator, "log", lambda self, values, step=None, log_kwargs=None:
                        seen.append((step, dict(values))))
    out = tmp_path / "run"
    assert main(["--model", str(tiny_model_dir), "--dataset", str(tiny_data["train"]), "--eval-dataset",
                 str(tiny_data["eval"]), "--block-size", "32", "--batch-size", "4", "--max-steps", "6",
                 "--resample-every", "4", "--rosa.rank", "4", "--max-train-blocks", "48", "--max-eval-blocks", "4",
                 "--report-to", "mlflow", "--save-merged", "false", "--output-dir", str(out)]) == 0
    assert started["project"] == "rosa-train" and started["rosa.rank"] == 4 and started["report_to"] == "mlflow"
    assert [s for s, v in seen if "loss" in v] == [1, 2, 3, 4, 5, 6]
    assert [s for s, v in seen if "resample_s" in v] == [4] and seen[0][0] == 0 and "eval_loss" in seen[0][1]
    assert not (out / "tensorboard").exists()

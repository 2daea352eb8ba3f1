"""Experiment trackers a run reports to, besides metrics.jsonl: TensorBoard (written by
``MetricsWriter`` itself) and the others accelerate supports (through ``Accelerator.log``)."""
from __future__ import annotations

import importlib.util

from .config import ConfigError, flat_keys

# report_to name -> the module that must be importable
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
            "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}


def tracker_names(report_to: str) -> list[str]:
    """The trackers ``report_to`` names ('none': no tracker; 'auto': TensorBoard if it is installed); one
    ``ConfigError`` line for an unknown name."""
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    if names == ["none"]:
        return []
    if names == ["auto"]:
        return ["tensorboard"] if is_installed("tensorboard") else []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown or not names:
        raise ConfigError(f"config key 'report_to': unknown tracker {(unknown or [report_to])[0]!r}; choose from "
                          f"{', '.join(TRACKERS)} (comma-separated) or none")
    return names


def is_installed(name: str) -> bool:
    return importlib.util.find_spec(TRACKERS[name]) is not None


def check_installed(names: list[str]) -> None:
    """Before anything runs: a tracker that is not installed is one line, not a warning later."""
    missing = [n for n in names if not is_installed(n)]
    if missing:
        raise ConfigError(f"config key 'report_to' names {missing[0]}, which is not installed "
                          f"(pip install {TRACKERS[missing[0]]}), or drop it from report_to")


def flat_config(tree: dict) -> dict:
    """The config's dotted keys with plain values (trackers take flat hyperparameters)."""
    return {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for k, v in flat_keys(tree).items()}

import os

import pytest
import torch

from tests.tiny import corpus, save_tiny_model_dir, write_jsonl

# a process of a multi-process test that dies in C++ (SIGABRT, SIGSEGV) prints its Python stack
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        "train": write_jsonl(root / "train.jsonl", corpus(400, seed=0)),
        "eval": write_jsonl(root / "eval.jsonl", corpus(40, seed=1)),
    }

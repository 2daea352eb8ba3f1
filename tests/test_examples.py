"""The examples under examples/ run as users run them (on the tiny model here): transformers'
Trainer and TRL's SFTTrainer with RosaCallback, each leaving a merged model plain transformers loads."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# plain-text markers: the tiny model's vocabulary has no room for new special tokens
TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}<eos>\n{% endfor %}"
            "{% if add_generation_prompt %}### assistant:\n{% endif %}")


def _run(script, *args, monkeypatch, capsys):
    """As ``python examples/<script> args...`` would, in this process (no second interpreter start-up)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    return capsys.readouterr().out


def _loads(folder: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear"


def test_trainer_example(tiny_model_dir, tiny_data, tmp_path, monkeypatch, capsys):
    out = _run("trainer_rosa.py", "--model", str(tiny_model_dir), "--dataset", str(tiny_data["train"]),
               "--max-steps", "6", "--rank", "4", "--output-dir", str(tmp_path / "run"), monkeypatch=monkeypatch,
               capsys=capsys)
    assert "merged model" in out
    _loads(tmp_path / "run" / "merged")


def test_sft_chat_example(tiny_model_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("trl")
    from transformers import AutoTokenizer

    model = tmp_path / "chat-model"
    (model).mkdir()
    for f in tiny_model_dir.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(model)
    out = _run("sft_chat_rosa.py", "--model", str(model), "--max-steps", "6", "--rank", "4",
               "--output-dir", str(tmp_path / "run"), monkeypatch=monkeypatch, capsys=capsys)
    assert "merged model" in out
    _loads(tmp_path / "run" / "merged")

"""`train` on a fused tiny MoE with all-linear LoRA (attention and experts): the loss goes down, the adapter holds the
expert factors, the dropout note, and a run stopped after a checkpoint resumes to the same adapter bit for bit."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from qlora_trainer import checkpoint as ckpt
from qlora_trainer import train as train_mod
from qlora_trainer.config import build_config
from tests.helpers import Stop, save_then_die
from tests.moe_helpers import write_fused_moe

warnings.filterwarnings("ignore", message=".*RoPE.*")
ROWS = ["the cat sat", "the dog ran", "a b c", "hello there", "what is 2 + 3 ? 5", "yes no ok", "the cat ran",
        "hi there", "a cat sat", "the dog sat"]


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    """config(out, **overrides) for a fused tiny Qwen3-MoE on ten short text rows."""
    root = tmp_path_factory.mktemp("moe-train")
    base = write_fused_moe(root / "base", "qwen3_moe")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"text": row}) + "\n" for row in ROWS))

    def config(out, **overrides):
        flat = {"model.path": str(base), "model.compute_dtype": "fp32", "data.path": str(data), "data.format": "text",
                "data.max_seq_len": 16, "data.eval_fraction": 0, "lora.r": 4, "lora.alpha": 8, "lora.dropout": 0.05,
                "train.optimizer": "adamw", "train.batch_size": 5, "train.grad_accum": 1, "train.lr": 5e-3,
                "train.warmup_steps": 0, "train.max_steps": 4, "train.save_every": 2, "train.eval_every": 100,
                "train.log_every": 1, "out": str(out)}
        flat.update(overrides)
        return build_config(flat)

    return config


def _quiet(*_):
    pass


@pytest.mark.slow
def test_training_with_expert_lora_lowers_the_loss(tmp_path, moe_run):
    logs = []
    cfg = moe_run(tmp_path / "run", **{"train.max_steps": 6, "train.lr": 2e-2, "train.schedule": "constant"})
    train_mod.train(cfg, progress=False, log=logs.append)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.25, losses  # from ln(128) = 4.85 towards the rows' words
    assert any("lora.dropout 0.05: on the linear layers only" in line for line in logs)
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    assert config["lora_dropout"] == 0.0
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.1.mlp.experts.base_layer.lora_B.weight"].abs().sum() > 0


@pytest.mark.slow
def test_a_stopped_moe_run_resumes_to_the_same_expert_factors(tmp_path, moe_run, monkeypatch):
    train_mod.train(moe_run(tmp_path / "straight"), progress=False, log=_quiet)
    real_save = ckpt.save_checkpoint
    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die(real_save, at_step=2))
    with pytest.raises(Stop):
        train_mod.train(moe_run(tmp_path / "resumed"), progress=False, log=_quiet)
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    logs = []
    train_mod.train(moe_run(tmp_path / "resumed", resume=True), progress=False, log=logs.append)
    assert any("resumed from" in line for line in logs)
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(".base_layer.lora_A" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key

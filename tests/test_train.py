"""The training loop on the shipped tiny model: exact resume, the NaN guard, schedules, and learning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from qlora_trainer import checkpoint as ckpt
from qlora_trainer import train as train_mod
from qlora_trainer import training
from qlora_trainer.config import build_config
from qlora_trainer.data import collate
from qlora_trainer.errors import UserError
from qlora_trainer.loading import load_quantized
from qlora_trainer.lora import apply_lora, lora_state_dict
from qlora_trainer.loss import CausalLMLoss
from qlora_trainer.stopping import Interrupted, StopRequest
from tests.helpers import ASSET, DEMO, straight_and_stopped_at_step_2


@pytest.fixture(scope="module")
def small_eval_set(tmp_path_factory) -> Path:
    """The first 12 held-out rows: evaluation on all 100 would dominate these short runs."""
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    path.write_text("\n".join((DEMO / "eval.jsonl").read_text().splitlines()[:12]) + "\n")
    return path


@pytest.fixture
def config(small_eval_set):
    """config(out, **train_overrides): the run config of these tests (keys without a dot are train.*)."""
    return lambda out, **overrides: _config(out, small_eval_set, **overrides)


def _config(out: Path, eval_path: Path, **train_overrides):
    flat = {"model.path": str(ASSET), "model.compute_dtype": "fp32", "data.path": str(DEMO / "train.jsonl"),
            "data.format": "chat", "data.eval_path": str(eval_path), "data.max_seq_len": 64,
            "lora.r": 4, "lora.alpha": 8, "lora.dropout": 0.1, "train.optimizer": "adamw", "train.batch_size": 4,
            "train.grad_accum": 2, "train.lr": 2e-3, "train.warmup_steps": 2, "train.schedule": "cosine",
            "train.max_steps": 6, "train.save_every": 3, "train.eval_every": 3, "train.log_every": 1, "out": str(out)}
    flat.update({f"train.{k}" if "." not in k else k: v for k, v in train_overrides.items()})
    return build_config(flat)


def _adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "paged_adamw_8bit"])
def test_stopped_and_resumed_run_is_bitwise_identical(tmp_path, monkeypatch, config, optimizer):
    def run_config(out):
        return config(out, max_steps=4, save_every=2, batch_size=2, optimizer=optimizer)

    straight_and_stopped_at_step_2(run_config, tmp_path, monkeypatch)
    assert not (tmp_path / "resumed" / "adapter").exists()
    resumed_cfg = run_config(tmp_path / "resumed")
    resumed_cfg.resume = True
    logs = []
    train_mod.train(resumed_cfg, progress=False, log=logs.append)
    assert any("resumed from" in line and "step-000002" in line for line in logs)

    a, b = _adapter_tensors(tmp_path / "straight" / "adapter"), _adapter_tensors(tmp_path / "resumed" / "adapter")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # nothing logged twice, nothing missing


def test_resume_falls_back_past_a_corrupt_checkpoint(tmp_path, config):
    cfg = config(tmp_path / "run", max_steps=4, save_every=2, keep_checkpoints=3)
    train_mod.train(cfg, progress=False, log=lambda *_: None)
    newest = ckpt.checkpoint_dir(tmp_path / "run", 4)
    blob = bytearray((newest / "adapter_model.safetensors").read_bytes())
    blob[-3] ^= 0xFF  # flip bits in a weight
    (newest / "adapter_model.safetensors").write_bytes(bytes(blob))
    messages = []
    found = ckpt.latest_checkpoint(tmp_path / "run", warn=messages.append)
    assert found is not None and found[0].name == "step-000002"
    assert "step-000004" in messages[0] and "checksum mismatch" in messages[0]


@pytest.mark.slow
def test_loss_goes_down_and_outputs_land(tmp_path, config):
    """Eight examples seen again and again: the adapter must fit them."""
    rows = (DEMO / "train.jsonl").read_text().splitlines()[:8]
    (tmp_path / "small.jsonl").write_text("\n".join(rows) + "\n")
    cfg = config(tmp_path / "run", max_steps=30, eval_every=15, save_every=15, lr=5e-3, grad_accum=1,
                  **{"data.path": str(tmp_path / "small.jsonl"), "data.eval_path": str(tmp_path / "small.jsonl"),
                     "lora.dropout": 0.0})
    result = train_mod.train(cfg, progress=False, log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert set(rows[0]) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mem_gb"}
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert result.skipped_steps == 0


@pytest.mark.slow
def test_nan_gradient_is_skipped_then_stops_with_a_checkpoint(tmp_path, config, monkeypatch):
    real_forward = CausalLMLoss.forward
    calls = {"n": 0}
    poisoned = {3}  # micro-batch calls (2 per step) that return NaN: step 2's first micro-batch

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        summed, n = real_forward(self, *args, **kwargs)
        return (summed * float("nan") if calls["n"] in poisoned else summed), n

    monkeypatch.setattr(CausalLMLoss, "forward", forward)
    logs = []
    result = train_mod.train(config(tmp_path / "run", max_steps=4, save_every=4), progress=False, log=logs.append)
    assert result.skipped_steps == 1
    assert any("step 2: non-finite" in line for line in logs)
    adapter = _adapter_tensors(tmp_path / "run" / "adapter")
    assert all(torch.isfinite(t).all() for t in adapter.values())

    poisoned.update(range(1, 1000))  # every step from now on
    calls["n"] = 0
    with pytest.raises(UserError, match=r"3 steps in a row had a NaN/inf.*step-000003"):
        train_mod.train(config(tmp_path / "run2", max_steps=10, max_bad_steps=3), progress=False,
                        log=lambda *_: None)
    saved = _adapter_tensors(ckpt.checkpoint_dir(tmp_path / "run2", 3))
    assert all(torch.isfinite(t).all() for t in saved.values())


@pytest.mark.parametrize("schedule,reference", [("cosine", get_cosine_schedule_with_warmup),
                                                ("linear", get_linear_schedule_with_warmup)])
def test_lr_schedule_matches_transformers(schedule, reference, tmp_path, config):
    cfg = config(tmp_path, max_steps=50, warmup_steps=5, schedule=schedule, lr=1e-3).train
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = reference(opt, num_warmup_steps=5, num_training_steps=50)
    for step in range(50):
        if step > 0:  # transformers' warmup starts at 0; ours starts at lr/warmup so step 0 is not wasted
            assert math.isclose(training.lr_at(step, cfg), sched.get_last_lr()[0] * (1 if step >= 5 else
                                (step + 1) / step), rel_tol=1e-9, abs_tol=1e-12), step
        opt.step()
        sched.step()


def test_every_epoch_visits_each_example_once():
    n, batch, accum = 10, 3, 2
    seen = [i for step in range(10) for mb in training.batch_indices(step, n, batch, accum, seed=7) for i in mb]
    assert len(seen) == 60
    for epoch in range(6):
        assert sorted(seen[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert seen[:n] != seen[n:2 * n]  # a new order each epoch
    assert training.batch_indices(4, n, batch, accum, seed=7) == training.batch_indices(4, n, batch, accum, seed=7)


def test_gradient_accumulation_weights_every_token_equally(tmp_path, config):
    """Two micro-batches of different lengths give the gradient of one batch holding both."""
    from accelerate import Accelerator

    from qlora_trainer.data import build_datasets, load_tokenizer

    cfg = config(tmp_path)
    tokenizer = load_tokenizer(cfg.model.path)
    examples, _, _ = build_datasets(cfg.data, tokenizer)
    short, long_ = examples[0], max(examples[:50], key=lambda e: len(e["input_ids"]))
    grads = []
    for micro in ([collate([short], 2), collate([long_], 2)], [collate([short, long_], 2)]):
        model = load_quantized(ASSET, compute_dtype="fp32", device="cpu", progress=False)
        torch.manual_seed(0)
        apply_lora(model, "all-linear", r=4, alpha=8)
        for p in lora_state_dict(model).values():
            torch.nn.init.normal_(p, std=0.02)  # B = 0 would leave A without a gradient
        model.train()
        params = list(lora_state_dict(model).values())
        opt = torch.optim.SGD(params, lr=0.0)
        captured = {}
        opt.step = lambda: captured.update({i: p.grad.clone() for i, p in enumerate(params)})
        training.train_step(CausalLMLoss(model), micro, opt, params, 0.0, 1e9, Accelerator(cpu=True))
        grads.append(captured)
    for i in grads[0]:
        torch.testing.assert_close(grads[0][i], grads[1][i], rtol=1e-4, atol=1e-7)


def test_packed_batch_gives_the_loss_of_the_same_examples_unpacked(tmp_path, config):
    """Packing must not let one example attend to (or be positioned after) another."""
    from qlora_trainer.data import build_datasets, load_tokenizer, pack

    cfg = config(tmp_path)
    examples, _, _ = build_datasets(cfg.data, load_tokenizer(cfg.model.path))
    some = examples[:5]
    model = load_quantized(ASSET, compute_dtype="fp32", device="cpu", progress=False)
    loss_model = CausalLMLoss(model)
    with torch.no_grad():
        packed_sum, packed_n = loss_model(**collate(pack(some, 64), 2))
        unpacked_sum, unpacked_n = loss_model(**collate(some, 2))
    assert len(pack(some, 64)) < len(some) and packed_n == unpacked_n
    torch.testing.assert_close(packed_sum, unpacked_sum, rtol=1e-5, atol=1e-5)


def test_output_folder_errors(tmp_path, config):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        train_mod.train(config(tmp_path / "file"), progress=False)
    (tmp_path / "old" / "checkpoints" / "step-000001").mkdir(parents=True)
    with pytest.raises(UserError, match="resume=true"):
        train_mod.train(config(tmp_path / "old"), progress=False)


# ------------------------------------------------------------------------------------------ train.epochs (issue 17)

def test_batch_indices_stop_where_the_epochs_end():
    n, batch, accum = 10, 3, 2  # 6 a step: one epoch is a step of 6 and a short one of 4
    steps = training.steps_for(training.epoch_examples(1, n), batch, accum)
    assert steps == 2
    last = training.batch_indices(1, n, batch, accum, seed=7, limit=10)
    assert [len(mb) for mb in last] == [3, 1]
    seen = [i for s in range(steps) for mb in training.batch_indices(s, n, batch, accum, seed=7, limit=10) for i in mb]
    assert sorted(seen) == list(range(n))
    assert training.batch_indices(0, n, batch, accum, seed=7, limit=10) == training.batch_indices(0, n, batch, accum,
                                                                                                  seed=7)
    assert training.steps_for(training.epoch_examples(2.5, n), batch, accum) == 5  # 25 examples
    assert training.epoch_examples(0.01, n) == 1


@pytest.mark.parametrize("epochs, packing", [(1, False), (2, True), (0.5, False)])
def test_epochs_set_the_number_of_steps_from_the_training_examples(tmp_path, config, epochs, packing):
    cfg = config(tmp_path / "run", max_steps=None, epochs=epochs, batch_size=4, grad_accum=3,
                 **{"data.packing": packing})
    run = train_mod.Run(cfg, progress=False, log=lambda *_: None).setup()
    n = len(run.train_examples)  # after packing
    assert (n < run.stats.train_examples) is packing
    wanted = -(-round(epochs * n) // 12)
    assert run.max_steps == wanted and run.train_cfg.max_steps == wanted
    assert cfg.train.max_steps is None and cfg.train.epochs == epochs  # what config.yaml keeps: a rerun plans again
    seen = [i for step in range(run.max_steps) for mb in run.batch_indices(step) for i in mb]
    assert len(seen) == round(epochs * n)
    if epochs == 1:
        assert sorted(seen) == list(range(n))  # every example exactly once
    # the lr schedule is built on the derived steps: it decays to the end of the run, not of 1000 steps
    assert training.lr_at(run.max_steps - 1, run.train_cfg) < 0.1 * cfg.train.lr


@pytest.mark.slow
def test_an_epochs_run_stopped_and_resumed_is_bitwise_identical_and_its_config_reruns(tmp_path, monkeypatch, config):
    def run_config(out):  # 2 epochs of the eval set's 12 rows as training data: 24 examples, 6 a step: 4 steps
        return config(out, max_steps=None, epochs=2, batch_size=3, save_every=2,
                      **{"data.path": str(config(out).data.eval_path)})

    straight_and_stopped_at_step_2(run_config, tmp_path, monkeypatch)
    from qlora_trainer.config import load_config

    rerun = load_config(str(tmp_path / "resumed" / "config.yaml"), ["resume=true"])  # the resolved config as is
    assert (rerun.train.epochs, rerun.train.max_steps) == (2, None)
    result = train_mod.train(rerun, progress=False, log=lambda *_: None)
    assert result.steps == 4 and result.resumed_from == 2
    a, b = _adapter_tensors(tmp_path / "straight" / "adapter"), _adapter_tensors(tmp_path / "resumed" / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ resuming a finished run

@pytest.mark.slow
def test_resuming_a_finished_run_says_it_was_complete_with_its_real_losses(tmp_path, config, capsys):
    from qlora_trainer import cli
    from qlora_trainer.config import save_config

    cfg = config(tmp_path / "run", max_steps=3, save_every=2, eval_every=2)
    save_config(cfg, tmp_path / "cfg.yaml")
    assert cli.main(["train", str(tmp_path / "cfg.yaml")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    capsys.readouterr()

    assert cli.main(["train", str(tmp_path / "cfg.yaml"), "--resume"]) == 0
    out = capsys.readouterr().out
    final = [line for line in out.splitlines() if "final loss" in line]
    assert len(final) == 1 and final[0].startswith("already complete:") and "step 3" in final[0], out
    assert f"final loss {rows[-1]['loss']:.4f}" in final[0] and f"eval loss {rows[-1]['eval_loss']:.4f}" in final[0]
    assert "nan" not in out and "done:" not in out

    # fewer steps than the checkpoint: refused, and config.yaml still says what the run was
    before = (tmp_path / "run" / "config.yaml").read_text()
    assert cli.main(["train", str(tmp_path / "cfg.yaml"), "train.max_steps=2", "--resume"]) == 2
    assert "checkpoint is at step 3, past this config's 2 steps" in capsys.readouterr().err
    assert (tmp_path / "run" / "config.yaml").read_text() == before


# ------------------------------------------------------------------------------------------ stopping on a signal

def test_a_stop_request_asks_once_then_exits_at_once():
    import signal

    stop = StopRequest()
    with pytest.raises(KeyboardInterrupt):  # before training: nothing to save, stop now
        stop(signal.SIGINT, None)
    stop.training = True
    stop(signal.SIGTERM, None)
    assert stop.requested and stop.signum == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):  # the second signal
        stop(signal.SIGINT, None)


@pytest.mark.slow
def test_a_stopped_run_saves_its_step_and_adapter_and_resumes_exactly(tmp_path, config, monkeypatch):
    import signal

    def run_config(out):
        return config(out, max_steps=5, save_every=100)  # no regular checkpoint before the end

    straight = train_mod.train(run_config(tmp_path / "straight"), progress=False, log=lambda *_: None)
    stop = StopRequest()
    real_step = train_mod.Run.step

    def step(self, i):
        if i == 2:  # the signal arrives during the third step: that step finishes, then the run stops
            stop(signal.SIGINT, None)
        return real_step(self, i)

    monkeypatch.setattr(train_mod.Run, "step", step)
    with pytest.raises(Interrupted) as stopped:
        train_mod.train(run_config(tmp_path / "stopped"), progress=False, log=lambda *_: None, stop=stop)
    monkeypatch.setattr(train_mod.Run, "step", real_step)
    assert (stopped.value.step, stopped.value.signum) == (3, signal.SIGINT)
    assert stopped.value.checkpoint == ckpt.checkpoint_dir(tmp_path / "stopped", 3)
    assert sorted(p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()) == ["step-000003"]
    saved, adapter = _adapter_tensors(stopped.value.checkpoint), _adapter_tensors(tmp_path / "stopped" / "adapter")
    assert all(torch.equal(saved[k], adapter[k]) for k in saved)

    resumed_cfg = run_config(tmp_path / "stopped")
    resumed_cfg.resume = True
    train_mod.train(resumed_cfg, progress=False, log=lambda *_: None)
    a, b = _adapter_tensors(straight.adapter), _adapter_tensors(tmp_path / "stopped" / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

"""The training loop: small functions around one step, with exact resume.

Everything that changes during training is a function of (config, step) plus what a checkpoint stores:
the data order is a seeded permutation per epoch indexed by the step, the learning rate is `lr_at(step)`,
and the adapter, optimizer state and RNG states are saved together. A run stopped after N steps and
resumed is therefore bitwise identical to one that never stopped (CPU, fp32; see tests/test_train.py).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from qlora_trainer import atomic, classify, lock
from qlora_trainer import checkpoint as ckpt
from qlora_trainer.adapter import base_fingerprint, read_adapter, save_adapter, write_adapter_files
from qlora_trainer.config import RunConfig, load_config, save_config
from qlora_trainer.data import build_datasets, collate, load_tokenizer, pad_token_id
from qlora_trainer.errors import UserError
from qlora_trainer.loading import load_quantized, read_config, resolve_model_dir
from qlora_trainer.lora import apply_lora, lora_state_dict, trainable_parameter_summary
from qlora_trainer.loss import CausalLMLoss
from qlora_trainer.quant import make_optimizer
from qlora_trainer.spectrum import model_spectra, verdict

SPIKE_FACTOR = 3.0  # a loss this many times the recent average is reported as a spike


@dataclass
class TrainResult:
    out: Path
    steps: int
    final_loss: float
    eval_loss: float | None
    skipped_steps: int
    history: list[dict] = field(default_factory=list)
    eval_metrics: dict = field(default_factory=dict)  # the last eval: eval_loss (+ eval_accuracy, eval_f1)


# ------------------------------------------------------------------------------------------ pure pieces

def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, cfg) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine/linear decay to 0 or constant
    (the schedules of transformers' get_*_schedule_with_warmup)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return cfg.lr * max(0.0, 1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_indices(step: int, n_examples: int, batch_size: int, grad_accum: int, seed: int) -> list[list[int]]:
    """The example indices of each micro-batch of optimizer step `step`. Epoch e visits the examples in a
    permutation seeded by (seed, e); the position in the stream is step * batch_size * grad_accum."""
    per_step = batch_size * grad_accum
    flat = []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(i, n_examples)
        flat.append(_permutation(n_examples, seed, epoch)[pos])
    return [flat[k:k + batch_size] for k in range(0, per_step, batch_size)]


_PERMUTATIONS: dict[tuple[int, int, int], list[int]] = {}


def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _PERMUTATIONS:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        _PERMUTATIONS[key] = torch.randperm(n, generator=generator).tolist()
    return _PERMUTATIONS[key]


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward pass (non-reentrant: works with a frozen base)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def count_tokens(batch: dict) -> int:
    """Input tokens that are not padding."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


# ------------------------------------------------------------------------------------------ one step

def train_step(loss_model, micro_batches: list[dict], optimizer, params: list[torch.nn.Parameter], lr: float,
               max_grad_norm: float, accelerator: Accelerator) -> tuple[float, float, bool]:
    """One optimizer step over grad_accum micro-batches. The loss is the mean over all trained tokens of the
    step (not a mean of per-batch means, which over-weights short batches). Returns (loss, grad_norm, ok):
    a non-finite loss or gradient skips the update and leaves the adapter untouched."""
    total_tokens = sum(_trained_count(mb["labels"]) for mb in micro_batches)
    loss_sum = 0.0
    for mb in micro_batches:
        with accelerator.autocast():
            summed, _ = loss_model(**mb)
        accelerator.backward(summed / max(total_tokens, 1))
        loss_sum += float(summed.detach())
    loss = loss_sum / max(total_tokens, 1)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    ok = math.isfinite(loss) and math.isfinite(grad_norm)
    if ok:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, ok


@torch.no_grad()
def evaluate(loss_model, examples: list[dict], batch_size: int, pad_id: int, device) -> float | None:
    if not examples:
        return None
    was_training = loss_model.training
    loss_model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = _to_device(collate(examples[start:start + batch_size], pad_id), device)
        summed, n = loss_model(**batch)
        total += float(summed)
        tokens += n
    loss_model.train(was_training)
    return total / max(tokens, 1)


def _evaluate(loss_model, examples: list[dict], batch_size: int, pad_id: int, device) -> dict:
    """{eval_loss} for a causal LM; {eval_loss, eval_accuracy, eval_f1} for a classifier ({} with no eval set)."""
    if isinstance(loss_model, classify.ClassifierLoss):
        return classify.evaluate_classifier(loss_model, examples, batch_size, pad_id, device)
    loss = evaluate(loss_model, examples, batch_size, pad_id, device)
    return {} if loss is None else {"eval_loss": round(loss, 6)}


def _trained_count(labels: torch.Tensor) -> int:
    """What the loss is a mean over: trained tokens (labels (B, T), shifted) or examples (a classifier's (B,))."""
    if labels.dim() == 1:
        return labels.numel()
    return int((labels[:, 1:] != -100).sum())


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------ the run

def check_output_folder(cfg: RunConfig) -> Path:
    """Refuse an `out` that is a file, or that holds an earlier run when resume is off, before loading anything."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out} is a file, not a folder: choose another out")
    lock.check_free(out)  # a live run in `out`: say so before loading anything
    if not cfg.resume and (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise UserError(f"out={out} already holds checkpoints of an earlier run: pass resume=true (or --resume) "
                        f"to continue it, or choose another out")
    return out


def train(cfg: RunConfig, *, progress: bool = True, log=print) -> TrainResult:
    """Fine-tune as `cfg` says into cfg.out, which this run holds locked (see lock.py) until it returns."""
    out = check_output_folder(cfg)
    with lock.RunLock(out) as run_lock:
        try:
            return _train(cfg, out, run_lock, progress=progress, log=log)
        except OSError as err:
            if err.errno in atomic.DISK_FULL:  # metrics, config.yaml, loss.png: checkpoints say more themselves
                raise atomic.disk_full_error(out, err) from None
            raise


def _train(cfg: RunConfig, out: Path, run_lock: lock.RunLock, *, progress: bool, log) -> TrainResult:
    tokenizer = load_tokenizer(cfg)
    train_examples, eval_examples, stats = build_datasets(cfg.data, tokenizer, cfg.train.seed, cfg.model.num_labels)
    labels = classify.label_names_for(cfg.model.num_labels, stats) if cfg.model.task == "classification" else None
    log(stats.summary())

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
    set_seed(cfg.train.seed)
    model = load_quantized(cfg.model.path, compute_dtype=cfg.model.compute_dtype, device=accelerator.device,
                           trust_remote_code=cfg.model.trust_remote_code, progress=progress, task=cfg.model.task,
                           num_labels=len(labels) if labels else None)
    apply_lora(model, cfg.lora.targets, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
               use_rslora=cfg.lora.use_rslora)
    head = classify.prepare_head(model, labels, pad_token_id(tokenizer)) if labels else []  # fp32, trained in full
    log(trainable_parameter_summary(model)[2])
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    params = list(lora_state_dict(model).values()) + head
    optimizer = make_optimizer(cfg.train.optimizer, params, cfg.train.lr, cfg.train.weight_decay)
    objective = classify.ClassifierLoss(model) if labels else CausalLMLoss(model, cfg.train.loss_chunk_size)
    loss_model, optimizer = accelerator.prepare(objective, optimizer)

    run_lock.acquire()  # creates `out`; refuses if another run holds it
    save_config(cfg, str(out / "config.yaml"))
    start_step, skipped = 0, 0
    if cfg.resume:
        start_step, skipped = _resume(out, model, optimizer, log)
    history = _read_metrics(out, up_to=start_step)
    _write_metrics(out, history)

    pad_id = pad_token_id(tokenizer)
    saver = _checkpoint_writer(cfg, model)
    bad_in_a_row, recent, loss, eval_loss, eval_metrics = 0, [], float("nan"), None, {}
    window_tokens, window_start = 0, time.perf_counter()
    bar = tqdm(range(start_step, cfg.train.max_steps), initial=start_step, total=cfg.train.max_steps,
               desc="training", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        indices = batch_indices(step, len(train_examples), cfg.train.batch_size, cfg.train.grad_accum, cfg.train.seed)
        micro = [_to_device(collate([train_examples[i] for i in idx], pad_id), accelerator.device) for idx in indices]
        window_tokens += sum(count_tokens(mb) for mb in micro)
        loss, grad_norm, ok = train_step(loss_model, micro, optimizer, params, lr_at(step, cfg.train),
                                         cfg.train.max_grad_norm, accelerator)
        done = step + 1
        if not ok:
            skipped += 1
            bad_in_a_row += 1
            log(f"step {done}: non-finite loss/gradient (loss={loss}, grad_norm={grad_norm}): update skipped")
            if bad_in_a_row >= cfg.train.max_bad_steps:
                path = saver(done, optimizer, skipped)
                raise UserError(f"{bad_in_a_row} steps in a row had a NaN/inf loss or gradient (last at step {done}); "
                                f"stopped. The last good adapter is in {path}. Lower train.lr or check the data.")
            continue
        bad_in_a_row = 0
        if recent and loss > SPIKE_FACTOR * (sum(recent) / len(recent)):
            log(f"step {done}: loss spike {loss:.4f} (recent mean {sum(recent) / len(recent):.4f})")
        recent = (recent + [loss])[-20:]
        evaluated = done % cfg.train.eval_every == 0 or done == cfg.train.max_steps
        if evaluated:
            eval_metrics = _evaluate(loss_model, eval_examples, cfg.train.batch_size, pad_id, accelerator.device)
            eval_loss = eval_metrics.get("eval_loss")
        if done % cfg.train.log_every == 0 or evaluated:
            elapsed = time.perf_counter() - window_start
            row = {"step": done, "loss": round(loss, 6), "lr": lr_at(step, cfg.train), "grad_norm": round(grad_norm, 6),
                   "tokens_per_s": round(window_tokens / max(elapsed, 1e-9), 1), "mem_gb": round(_memory_gb(), 3)}
            if evaluated:
                row.update(eval_metrics)  # eval_loss (+ eval_accuracy, eval_f1 for a classifier)
            history.append(row)
            _append_metric(out, row)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}",
                            mem=f"{row['mem_gb']:.2f}GB", **classify.bar_fields(eval_metrics))
            window_tokens, window_start = 0, time.perf_counter()
        if done % cfg.train.save_every == 0 or done == cfg.train.max_steps:
            saver(done, optimizer, skipped)
    bar.close()

    save_adapter(model, out / "adapter", **_adapter_kwargs(cfg, model))
    plot_losses(history, out / "loss.png")
    log(f"adapter rank: {verdict(model_spectra(model))}; details: qlora-trainer inspect {out / 'adapter'}")
    return TrainResult(out, cfg.train.max_steps, loss, eval_loss, skipped, history, eval_metrics)


def _adapter_kwargs(cfg: RunConfig, model) -> dict:
    task = classify.adapter_settings(model) if cfg.model.task == "classification" else {}
    return dict(base_model_name_or_path=str(cfg.model.path), r=cfg.lora.r, alpha=cfg.lora.alpha,
                dropout=cfg.lora.dropout, use_rslora=cfg.lora.use_rslora, fingerprint=base_fingerprint(model), **task)


def _checkpoint_writer(cfg: RunConfig, model):
    kwargs = _adapter_kwargs(cfg, model)

    def write(step: int, optimizer, skipped: int) -> Path:
        state = {"rng": ckpt.rng_state(), "skipped_steps": skipped, "max_steps": cfg.train.max_steps}
        return ckpt.save_checkpoint(Path(cfg.out), step, lambda folder: write_adapter_files(model, folder, **kwargs),
                                    optimizer, state, cfg.train.keep_checkpoints)

    return write


def _resume(out: Path, model, optimizer, log) -> tuple[int, int]:
    found = ckpt.latest_checkpoint(out, warn=log)
    if found is None:
        log(f"resume: no complete checkpoint in {out / 'checkpoints'}: starting from step 0")
        return 0, 0
    folder, state = found
    adapter = read_adapter(folder)
    modules = {name: m for name, m in model.named_modules() if hasattr(m, "lora_A")}
    if set(adapter.weights) != set(modules):
        raise UserError(f"{folder}: its LoRA modules differ from this config's lora.targets: resume with the "
                        f"config in {out / 'config.yaml'}")
    with torch.no_grad():
        for name, (A, B) in adapter.weights.items():
            modules[name].lora_A.copy_(A)
            modules[name].lora_B.copy_(B)
        for name, value in adapter.extra.items():  # a classifier's head (modules_to_save)
            model.get_parameter(name).copy_(value)
    ckpt.load_optimizer_state(folder, optimizer)
    ckpt.set_rng_state(state["rng"])
    log(f"resumed from {folder} (step {state['step']})")
    return int(state["step"]), int(state.get("skipped_steps", 0))


# ------------------------------------------------------------------------------------------ logs and plots

def _memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS, KiB -> GiB


def _read_metrics(out: Path, up_to: int) -> list[dict]:
    """Rows already logged up to the resumed step (rows past it belong to steps that will be redone)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if row.get("step", 0) <= up_to:
            rows.append(row)
    return rows


def _write_metrics(out: Path, rows: list[dict]) -> None:
    """Rewrite metrics.jsonl through a temporary file: a kill mid-rewrite must not lose the rows already logged."""
    tmp = out / ".metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out / "metrics.jsonl")


def _append_metric(out: Path, row: dict) -> None:
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def plot_losses(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train loss")
    evals = [r for r in history if r.get("eval_loss") is not None]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_train_command(config_path: str, overrides: list[str], *, resume: bool = False, dry_run: bool = False) -> int:
    cfg = load_config(config_path, list(overrides) + (["resume=true"] if resume else []))
    if dry_run:
        from qlora_trainer.data import run_data_command

        return run_data_command(config_path, overrides)
    # A missing model folder, a config.json that is not a JSON object, an unknown architecture or remote code
    # is reported before the data is read (and named as config.json, not as a tokenizer failure).
    read_config(resolve_model_dir(cfg.model.path), cfg.model.trust_remote_code)
    result = train(cfg, progress=sys.stderr.isatty() or os.environ.get("QLORA_PROGRESS") == "1")
    print(f"done: {result.steps} steps, final loss {result.final_loss:.4f}"
          + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
          + classify.summary_fields(result.eval_metrics)
          + (f", {result.skipped_steps} skipped (non-finite)" if result.skipped_steps else "")
          + f"\nadapter: {result.out / 'adapter'}\nmetrics: {result.out / 'metrics.jsonl'}, plot: {result.out / 'loss.png'}")
    return 0

"""The pure pieces of training: schedule, data order, one optimizer step, checkpointing switch, metrics files.

Everything that changes during training is a function of (config, step) plus what a checkpoint stores: the data
order is a seeded permutation per epoch indexed by the step, the learning rate is `lr_at(step)`. train.py's Run
puts these pieces together.
"""

from __future__ import annotations

import functools
import json
import math
import random
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from qlora_trainer import atomic
from qlora_trainer.distributed import World
from qlora_trainer.names import IGNORE_INDEX, METRICS_FILE


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, cfg) -> float:
    """Learning rate for optimizer step `step` (0-based) of a TrainConfig: linear warmup, then cosine/linear decay to
    0 or constant (the schedules of transformers' get_*_schedule_with_warmup)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return cfg.lr * max(0.0, 1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_indices(step: int, n_examples: int, batch_size: int, grad_accum: int, seed: int,
                  limit: int | None = None) -> list[list[int]]:
    """The example indices of each micro-batch of optimizer step `step`. Epoch e visits the examples in a
    permutation seeded by (seed, e); the position in the stream is step * batch_size * grad_accum. With `limit`
    (a run of train.epochs: epoch_examples) the stream ends at position `limit`: the last step is a short one."""
    per_step = batch_size * grad_accum
    end = (step + 1) * per_step if limit is None else min((step + 1) * per_step, limit)
    flat = []
    for i in range(step * per_step, end):
        epoch, pos = divmod(i, n_examples)
        flat.append(int(_permutation(n_examples, seed, epoch)[pos]))
    return [flat[k:k + batch_size] for k in range(0, len(flat), batch_size)]


def epoch_examples(epochs: float, n_examples: int) -> int:
    """How many examples `epochs` passes over `n_examples` draw from the data stream (at least one)."""
    return max(1, round(epochs * n_examples))


def steps_for(examples: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps that draw `examples` examples, batch_size * grad_accum a step (the last may be short)."""
    return -(-examples // (batch_size * grad_accum))


@functools.lru_cache(maxsize=4)  # a step spans at most two epochs; a few entries cover runs side by side
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """A numpy array, not a list: 8 bytes an example instead of a Python int's 36 (a million examples: 8 MB)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).numpy()


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


def trained_count(labels: torch.Tensor) -> int:
    """What the loss is a mean over: trained tokens (labels (B, T), shifted) or examples (a classifier's (B,))."""
    if labels.dim() == 1:
        return labels.numel()
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def train_step(loss_model, micro_batches: list[dict], optimizer, params: list[torch.nn.Parameter], lr: float,
               max_grad_norm: float, accelerator: Accelerator, world: World = World(),
               weights: list[float] | None = None) -> tuple[float, float, bool]:
    """One optimizer step over grad_accum micro-batches. The loss is the mean over all trained tokens of the
    step (not a mean of per-batch means, which over-weights short batches), on all of `world`'s ranks together
    (distributed.py): each rank divides by the global token count and the gradients are summed across ranks.
    `weights`: 1 per micro-batch, 0 for a stand-in that must run but add nothing (distributed.rank_share).
    Returns (loss, grad_norm, ok): a non-finite loss or gradient skips the update and leaves the adapter untouched."""
    weights = weights or [1.0] * len(micro_batches)
    local_tokens = sum(w * trained_count(mb["labels"]) for mb, w in zip(micro_batches, weights))
    total_tokens, = world.sum([local_tokens], "counting the step's trained tokens")
    loss_sum = 0.0
    for mb, w in zip(micro_batches, weights):
        with accelerator.autocast():
            summed, _ = loss_model(**mb)
        accelerator.backward(summed * w / max(total_tokens, 1))
        loss_sum += w * float(summed.detach())
    loss_sum, = world.sum([loss_sum], "summing the step's loss")
    world.sum_grads(params)
    loss = loss_sum / max(total_tokens, 1)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    ok = math.isfinite(loss) and math.isfinite(grad_norm)
    if ok:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, ok


def memory_gb() -> float:
    """Peak GPU memory allocated (GiB), or on CPU the peak resident memory of the process."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    from qlora_trainer.host_memory import process_peak_bytes

    return process_peak_bytes() / 2**30  # peak RSS (host_memory resets the kernel's counter between phases)


# ------------------------------------------------------------------------------------------ metrics files

def read_metrics(out: Path, up_to: int) -> list[dict]:
    """Rows of OUT/metrics.jsonl up to step `up_to` (rows past it belong to steps a resumed run redoes)."""
    path = out / METRICS_FILE
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


def write_metrics(out: Path, rows: list[dict]) -> None:
    """Rewrite metrics.jsonl atomically: a kill mid-rewrite must not lose the rows already logged."""
    atomic.write_text(out / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def append_metric(out: Path, row: dict) -> None:
    with open(out / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def plot_losses(history: list[dict], path: Path) -> None:
    """OUT/loss.png: training (and eval) loss against step."""
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
    try:
        atomic.write_file(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)



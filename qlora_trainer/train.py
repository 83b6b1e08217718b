"""A training run as a recipe: named setup steps, then one optimizer step at a time, with exact resume.

    train(cfg) -> TrainResult               the whole run, holding OUT's lock
    Run(cfg).setup(); run.step(i); ...      the same, piece by piece: a variant overrides one step
                                            (scripts/rank_sweep.py trains a classifier's head alone that way)

A run stopped after N steps and resumed is bitwise identical to one that never stopped (CPU, fp32; see
tests/test_train.py): the data order and the learning rate are functions of the step (training.py), and the adapter,
optimizer state and RNG states are saved together (checkpoint.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from qlora_trainer import atomic, lock, tasks
from qlora_trainer import checkpoint as ckpt
from qlora_trainer.adapter import copy_weights_into, read_adapter, save_adapter, write_model_adapter
from qlora_trainer.base_model import resolve_base
from qlora_trainer.config import RunConfig, save_config
from qlora_trainer.data import build_datasets, collate, load_tokenizer, pad_token_id
from qlora_trainer.errors import UserError
from qlora_trainer.loading import load_quantized
from qlora_trainer.lora import apply_lora, lora_modules, lora_state_dict, trainable_parameter_summary
from qlora_trainer.names import ADAPTER_DIR, CHECKPOINTS_DIR, LOSS_PLOT_FILE, METRICS_FILE, RUN_CONFIG_FILE
from qlora_trainer.quant import make_optimizer
from qlora_trainer.spectrum import model_spectra, verdict
from qlora_trainer.training import (append_metric, batch_indices, count_tokens, enable_checkpointing, lr_at, memory_gb,
                                    plot_losses, read_metrics, set_seed, to_device, train_step, write_metrics)

SPIKE_FACTOR = 3.0  # a loss this many times the recent average is reported as a spike
SPIKE_WINDOW = 20  # steps in that average


@dataclass
class TrainResult:
    out: Path
    steps: int
    final_loss: float
    eval_loss: float | None
    skipped_steps: int
    history: list[dict] = field(default_factory=list)
    eval_metrics: dict = field(default_factory=dict)  # the last eval: eval_loss (+ eval_accuracy, eval_f1)
    trainable_params: int = 0  # counted as PEFT counts them (a 4-bit weight: two parameters per byte)
    total_params: int = 0

    @property
    def adapter(self) -> Path:
        return self.out / ADAPTER_DIR

    @property
    def metrics(self) -> Path:
        return self.out / METRICS_FILE

    @property
    def plot(self) -> Path:
        return self.out / LOSS_PLOT_FILE


def check_output_folder(cfg: RunConfig) -> Path:
    """Refuse an `out` that is a file, or that holds an earlier run when resume is off, before loading anything."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out} is a file, not a folder: choose another out")
    lock.check_free(out)  # a live run in `out`: say so before loading anything
    checkpoints = out / CHECKPOINTS_DIR
    if not cfg.resume and checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise UserError(f"out={out} already holds checkpoints of an earlier run: pass resume=true (or --resume) "
                        f"to continue it, or choose another out")
    return out


def train(cfg: RunConfig, *, progress: bool = True, log=print) -> TrainResult:
    """Fine-tune as `cfg` says into cfg.out, which this run holds locked (see lock.py) until it returns."""
    out = check_output_folder(cfg)
    with lock.RunLock(out) as run_lock:
        try:
            run = Run(cfg, progress=progress, log=log)
            run.setup(run_lock)
            return run.fit()
        except OSError as err:
            if err.errno in atomic.DISK_FULL:  # metrics, config.yaml, loss.png: checkpoints say more themselves
                raise atomic.disk_full_error(out, err) from None
            raise


class Run:
    """One training run of a RunConfig. setup() runs the named steps (_load_data, _load_model, _make_optimizer,
    _resume); fit() runs step() per optimizer step with evaluation, logging and checkpoints, then finish()."""

    def __init__(self, cfg: RunConfig, *, progress: bool = True, log=print):
        self.cfg, self.out, self.progress, self.log = cfg, Path(cfg.out), progress, log
        self.task = tasks.get(cfg.model.task)
        self.start_step = self.skipped = 0
        self.history: list[dict] = []
        self.eval_metrics: dict = {}
        self.loss = float("nan")
        self.window_tokens, self.window_start = 0, time.perf_counter()  # tokens/s over the steps since the last log

    # ------------------------------------------------------------------ setup
    def setup(self, run_lock: lock.RunLock | None = None) -> Run:
        self._load_data()
        self._load_model()
        self._make_optimizer()
        if run_lock is not None:
            run_lock.acquire()  # creates `out`; refuses if another run holds it
        save_config(self.cfg, self.out / RUN_CONFIG_FILE)
        if self.cfg.resume:
            self._resume()
        self.history = read_metrics(self.out, up_to=self.start_step)
        write_metrics(self.out, self.history)
        return self

    def _load_data(self) -> None:
        cfg = self.cfg
        self.base = resolve_base(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        self.tokenizer = load_tokenizer(self.base)
        self.train_examples, self.eval_examples, self.stats = build_datasets(cfg.data, self.tokenizer, cfg.train.seed,
                                                                             cfg.model.num_labels)
        self.labels = self.task.head_labels(cfg.model.num_labels, self.stats)
        self.pad_id = pad_token_id(self.tokenizer)
        self.log(self.stats.summary())

    def _load_model(self) -> None:
        cfg = self.cfg
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
        set_seed(cfg.train.seed)
        self.model = load_quantized(self.base, compute_dtype=cfg.model.compute_dtype, device=self.accelerator.device,
                                    progress=self.progress, **self.task.model_kwargs(labels=self.labels))
        self._apply_lora()
        full = self.task.prepare_model(self.model, self.labels, self.pad_id)  # a head: fp32, trained in full
        self.trainable_params, self.total_params, line = trainable_parameter_summary(self.model)
        self.log(line)
        if cfg.train.gradient_checkpointing:
            enable_checkpointing(self.model)
        self.model.train()
        self.params = list(lora_state_dict(self.model).values()) + full

    def _apply_lora(self) -> None:
        lora = self.cfg.lora
        apply_lora(self.model, lora.targets, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                   use_rslora=lora.use_rslora)

    def _make_optimizer(self) -> None:
        train_cfg = self.cfg.train
        optimizer = make_optimizer(train_cfg.optimizer, self.params, train_cfg.lr, train_cfg.weight_decay)
        objective = self.task.loss_module(self.model, train_cfg.loss_chunk_size)
        self.loss_model, self.optimizer = self.accelerator.prepare(objective, optimizer)

    def _resume(self) -> None:
        found = ckpt.latest_checkpoint(self.out, warn=self.log)
        if found is None:
            self.log(f"resume: no complete checkpoint in {self.out / CHECKPOINTS_DIR}: starting from step 0")
            return
        folder, state = found
        adapter = read_adapter(folder)
        if set(adapter.weights) != set(lora_modules(self.model)):
            raise UserError(f"{folder}: its LoRA modules differ from this config's lora.targets: resume with the "
                            f"config in {self.out / RUN_CONFIG_FILE}")
        copy_weights_into(self.model, adapter)  # LoRA and a classifier's head (modules_to_save)
        ckpt.load_optimizer_state(folder, self.optimizer)
        ckpt.set_rng_state(state["rng"])
        self.log(f"resumed from {folder} (step {state['step']})")
        self.start_step, self.skipped = int(state["step"]), int(state.get("skipped_steps", 0))

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        """Steps start_step .. max_steps, then finish()."""
        train_cfg = self.cfg.train
        bad_in_a_row, recent = 0, []
        self.window_start = time.perf_counter()
        bar = tqdm(range(self.start_step, train_cfg.max_steps), initial=self.start_step, total=train_cfg.max_steps,
                   desc="training", unit="step", disable=not self.progress, dynamic_ncols=True)
        for step in bar:
            loss, grad_norm, ok = self.step(step)
            done = step + 1
            if not ok:
                bad_in_a_row += 1
                self._skip(done, loss, grad_norm, bad_in_a_row)
                continue
            bad_in_a_row = 0
            if recent and loss > SPIKE_FACTOR * (sum(recent) / len(recent)):
                self.log(f"step {done}: loss spike {loss:.4f} (recent mean {sum(recent) / len(recent):.4f})")
            recent = (recent + [loss])[-SPIKE_WINDOW:]
            evaluated = done % train_cfg.eval_every == 0 or done == train_cfg.max_steps
            if evaluated:
                self.evaluate()
            if done % train_cfg.log_every == 0 or evaluated:
                self._log_row(step, grad_norm, evaluated, bar)
            if done % train_cfg.save_every == 0 or done == train_cfg.max_steps:
                self.save_checkpoint(done)
        bar.close()
        return self.finish()

    def step(self, step: int) -> tuple[float, float, bool]:
        """Optimizer step `step` (0-based) on its micro-batches: (loss, grad_norm, ok), as training.train_step."""
        train_cfg = self.cfg.train
        indices = batch_indices(step, len(self.train_examples), train_cfg.batch_size, train_cfg.grad_accum,
                                train_cfg.seed)
        micro = [to_device(collate([self.train_examples[i] for i in idx], self.pad_id), self.accelerator.device)
                 for idx in indices]
        self.window_tokens += sum(count_tokens(mb) for mb in micro)
        self.loss, grad_norm, ok = train_step(self.loss_model, micro, self.optimizer, self.params,
                                              lr_at(step, train_cfg), train_cfg.max_grad_norm, self.accelerator)
        return self.loss, grad_norm, ok

    def evaluate(self) -> dict:
        """The task's metrics on the eval set ({} without one); kept as the run's latest eval."""
        self.eval_metrics = self.task.evaluate(self.loss_model, self.eval_examples, self.cfg.train.batch_size,
                                               self.pad_id, self.accelerator.device)
        return self.eval_metrics

    def save_checkpoint(self, done: int) -> Path:
        """checkpoints/step-NNNNNN: the adapter, the optimizer state, the RNG states and the counters."""
        state = {"rng": ckpt.rng_state(), "skipped_steps": self.skipped, "max_steps": self.cfg.train.max_steps}
        settings = self._adapter_settings()
        return ckpt.save_checkpoint(self.out, done, lambda folder: write_model_adapter(self.model, folder, **settings),
                                    self.optimizer, state, self.cfg.train.keep_checkpoints)

    def finish(self) -> TrainResult:
        """OUT/adapter and OUT/loss.png, the adapter's rank verdict in the log, and the result."""
        save_adapter(self.model, self.out / ADAPTER_DIR, **self._adapter_settings())
        plot_losses(self.history, self.out / LOSS_PLOT_FILE)
        self.log(f"adapter rank: {verdict(model_spectra(self.model))}; "
                 f"details: qlora-trainer inspect {self.out / ADAPTER_DIR}")
        return TrainResult(self.out, self.cfg.train.max_steps, self.loss, self.eval_metrics.get("eval_loss"),
                           self.skipped, self.history, self.eval_metrics, self.trainable_params, self.total_params)

    # ------------------------------------------------------------------ helpers of the loop
    def _skip(self, done: int, loss: float, grad_norm: float, bad_in_a_row: int) -> None:
        """A step whose loss or gradient was not finite: counted; max_bad_steps in a row save and stop."""
        self.skipped += 1
        self.log(f"step {done}: non-finite loss/gradient (loss={loss}, grad_norm={grad_norm}): update skipped")
        if bad_in_a_row >= self.cfg.train.max_bad_steps:
            path = self.save_checkpoint(done)
            raise UserError(f"{bad_in_a_row} steps in a row had a NaN/inf loss or gradient (last at step {done}); "
                            f"stopped. The last good adapter is in {path}. Lower train.lr or check the data.")

    def _log_row(self, step: int, grad_norm: float, evaluated: bool, bar) -> None:
        """One row of metrics.jsonl and the progress bar's fields."""
        elapsed = time.perf_counter() - self.window_start
        row = {"step": step + 1, "loss": round(self.loss, 6), "lr": lr_at(step, self.cfg.train),
               "grad_norm": round(grad_norm, 6), "tokens_per_s": round(self.window_tokens / max(elapsed, 1e-9), 1),
               "mem_gb": round(memory_gb(), 3)}
        if evaluated:
            row.update(self.eval_metrics)  # eval_loss (+ eval_accuracy, eval_f1 for a classifier)
        self.history.append(row)
        append_metric(self.out, row)
        bar.set_postfix(loss=f"{self.loss:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}",
                        mem=f"{row['mem_gb']:.2f}GB", **self.task.progress_fields(self.eval_metrics))
        self.window_tokens, self.window_start = 0, time.perf_counter()

    def _adapter_settings(self) -> dict:
        return dict(base_model_name_or_path=str(self.cfg.model.path), **self.task.adapter_settings(self.model))

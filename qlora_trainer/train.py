"""A training run as a recipe: named setup steps, then one optimizer step at a time, with exact resume.

    train(cfg) -> TrainResult               the whole run, holding OUT's lock
    Run(cfg).setup(); run.step(i); ...      the same, piece by piece: a variant overrides one step
                                            (scripts/rank_sweep.py trains a classifier's head alone that way)

A run stopped after N steps and resumed is bitwise identical to one that never stopped (CPU, fp32; see
tests/test_train.py): the data order and the learning rate are functions of the step (training.py), and the adapter,
optimizer state and RNG states are saved together (checkpoint.py).

A run given a StopRequest (stopping.py; cli/train.py wires one to SIGINT and SIGTERM) stops at the next step
boundary when asked: it writes a checkpoint and the adapter, then raises Interrupted, which says how to go on.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from qlora_trainer import atomic, distributed, libc, lock, tasks, trackers
from qlora_trainer import checkpoint as ckpt
from qlora_trainer.adapter import copy_weights_into, read_adapter, save_adapter, write_model_adapter
from qlora_trainer.base_model import resolve_base
from qlora_trainer.config import RunConfig, config_to_dict, save_config
from qlora_trainer.data import build_datasets, collate, load_tokenizer, pad_token_id, tokenizing_detail
from qlora_trainer.data_stream import streaming_datasets
from qlora_trainer.errors import UserError
from qlora_trainer.expert_lora import expert_lora_modules
from qlora_trainer.host_memory import HostMemory
from qlora_trainer.loading import load_quantized
from qlora_trainer.lora import apply_lora, lora_layers, lora_state_dict, trainable_parameter_summary
from qlora_trainer.names import (ADAPTER_DIR, CHECKPOINTS_DIR, HOST_MEMORY_FILE, LOSS_PLOT_FILE, METRICS_FILE,
                                 RUN_CONFIG_FILE)
from qlora_trainer.progress import bars, phase, say, training_line
from qlora_trainer.quant import make_optimizer
from qlora_trainer.spectrum import model_spectra, verdict
from qlora_trainer.stopping import Interrupted, StopRequest
from qlora_trainer.tasks.base import stand_in_forwards
from qlora_trainer.training import (append_metric, batch_indices, count_tokens, enable_checkpointing, epoch_examples,
                                    lr_at, memory_gb, plot_losses, read_metrics, set_seed, steps_for, to_device,
                                    train_step, write_metrics)

SPIKE_FACTOR = 3.0  # a loss this many times the recent average is reported as a spike
SPIKE_WINDOW = 20  # steps in that average
MMAP_THRESHOLD = 1 << 20  # host allocations this large are mapped on their own and unmapped when freed (libc.py)


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
    resumed_from: int = 0  # the checkpoint's step when resumed (== steps: the run was already complete)

    @property
    def already_complete(self) -> bool:
        """A resumed run whose checkpoint was its last step: nothing was trained this time."""
        return self.resumed_from >= self.steps > 0

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


def train(cfg: RunConfig, *, progress: bool | None = None, log=say, stop: StopRequest | None = None) -> TrainResult:
    """Fine-tune as `cfg` says into cfg.out, which this run holds locked (see lock.py) until it returns.

    progress: tqdm bars (True) or plain lines through `log` every train.log_every steps (False); None: the rule of
    progress.bars(). stop: see StopRequest; a stopped run raises Interrupted once its work is saved."""
    out = check_output_folder(cfg)
    with lock.RunLock(out) as run_lock:
        try:
            run = Run(cfg, progress=progress, log=log, stop=stop)
            try:
                run.setup(run_lock)
                return run.fit()
            finally:
                run.end_trackers()  # an error or a stop too: what was logged stays readable
        except OSError as err:
            if err.errno in atomic.DISK_FULL:  # metrics, config.yaml, loss.png: checkpoints say more themselves
                raise atomic.disk_full_error(out, err) from None
            raise


class Run:
    """One training run of a RunConfig. setup() runs the named steps (_load_data, _plan_steps, _load_model,
    _make_optimizer, _resume); fit() runs step() per optimizer step with evaluation, logging and checkpoints, then
    finish(). self.train_cfg is cfg.train with max_steps resolved (from train.epochs when that is set)."""

    def __init__(self, cfg: RunConfig, *, progress: bool | None = None, log=say, stop: StopRequest | None = None):
        self.cfg, self.out, self.log, self.stop = cfg, Path(cfg.out), log, stop
        self.progress = bars() if progress is None else progress
        self.world = distributed.World.from_env(cfg.train.ddp_timeout)  # accelerate launch: this process's rank
        if not self.world.is_main:  # the main process speaks for the run
            self.log, self.progress = distributed.quiet, False
        self.task = tasks.get(cfg.model.task)
        self.start_step = self.skipped = self.last_saved = 0
        self.history: list[dict] = []
        self.eval_metrics: dict = {}
        self.loss = float("nan")
        self.stream_end: int | None = None  # a train.epochs run: where its data stream ends (training.batch_indices)
        self.window_tokens, self.window_start = 0, time.perf_counter()  # tokens/s over the steps since the last log
        self.fit_start = time.perf_counter()
        trackers.check_installed(cfg.train.trackers)  # before anything heavy loads
        self.accelerator = None
        self.tracking = False  # train.report_to's trackers started (accelerator.init_trackers)
        self.memory = HostMemory(self.log)  # host memory by phase; this ends the "imports" phase

    @property
    def max_steps(self) -> int:
        return self.train_cfg.max_steps

    # ------------------------------------------------------------------ setup
    def setup(self, run_lock: lock.RunLock | None = None) -> Run:
        distributed.check_batch(self.cfg.train.batch_size, self.world, resuming=self.cfg.resume)
        if self.cfg.data.streaming and self.world.distributed:  # one stream, read in order by one process
            raise UserError(f"data.streaming reads its rows in one order on one process, and this run has "
                            f"{self.world.size}: set data.streaming=false (the token cache serves every rank)")
        libc.set_mmap_threshold(MMAP_THRESHOLD)  # a CPU step's freed weight-sized temporaries go back to the OS
        self._load_data()
        self._memory_phase("data")
        self._plan_steps()
        self._load_model()
        self._make_optimizer()
        if run_lock is not None:  # creates `out`; refuses (on every rank) if another run holds it
            self.world.main_does("taking the lock on out", run_lock.acquire)
        if self.cfg.resume:
            self._resume()  # before config.yaml: a refused resume leaves the run's files as they were
        self._memory_phase("model load")
        self.history = read_metrics(self.out, up_to=self.start_step)
        self.world.main_does("writing config.yaml and metrics.jsonl", self._write_run_files)
        if self.start_step:
            self._restore_last_metrics()
        self._start_trackers()
        return self

    def _write_run_files(self) -> None:
        save_config(self.cfg, self.out / RUN_CONFIG_FILE)
        write_metrics(self.out, self.history)

    def _load_data(self) -> None:
        cfg = self.cfg
        self.base = resolve_base(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        self.tokenizer = load_tokenizer(self.base)
        self.pad_id = pad_token_id(self.tokenizer)
        if cfg.data.streaming:
            self.train_examples, self.eval_examples, self.stats = streaming_datasets(cfg.data, self.tokenizer,
                                                                                     self.progress, self.log)
            self.labels = None
            return
        with phase(f"tokenizing {cfg.data.path}", self.log) as tokenizing:
            self.train_examples, self.eval_examples, self.stats = build_datasets(cfg.data, self.tokenizer,
                                                                                 cfg.train.seed, cfg.model.num_labels,
                                                                                 progress=self.progress)
            tokenizing["detail"] = f"{self.stats.rows} rows"
        self.log(f"tokens: {tokenizing_detail(self.stats)}")
        self.labels = self.task.head_labels(cfg.model.num_labels, self.stats)
        self.log(self.stats.summary())

    def _plan_steps(self) -> None:
        """train_cfg: train.max_steps as given, or train.epochs passes over the training examples (after packing),
        batch_size * grad_accum a step, the last step short if they do not divide evenly. The lr schedule and the
        data order read it; config.yaml keeps what the user set (epochs), so a rerun plans the same steps."""
        train_cfg = self.cfg.train
        if train_cfg.epochs is None:
            self.train_cfg, self.stream_end = train_cfg, None
            return
        if self.cfg.data.streaming:
            raise UserError("train.epochs needs the number of examples, which data.streaming does not count up "
                            "front: set train.max_steps instead, or data.streaming=false")
        n = len(self.train_examples)
        self.stream_end = epoch_examples(train_cfg.epochs, n)
        steps = steps_for(self.stream_end, train_cfg.batch_size, train_cfg.grad_accum)
        self.train_cfg = dataclasses.replace(train_cfg, epochs=None, max_steps=steps)
        self.log(f"train.epochs={train_cfg.epochs:g}: {self.stream_end} examples ({n} a pass), "
                 f"{train_cfg.batch_size * train_cfg.grad_accum} a step: {steps} steps")

    def _load_model(self) -> None:
        cfg = self.cfg
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no",
                                       log_with=trackers.make_trackers(cfg.train.trackers, self.out) or None,
                                       kwargs_handlers=distributed.accelerate_kwargs(self.world))
        set_seed(cfg.train.seed)
        with phase(f"loading the model {self.base.name}", self.log):
            self.model = load_quantized(self.base, compute_dtype=cfg.model.compute_dtype,
                                        device=self.accelerator.device, progress=self.progress,
                                        attn_implementation=cfg.model.attn_implementation, log=self.log,
                                        **self.task.model_kwargs(labels=self.labels))
        self._apply_lora()
        full = self.task.prepare_model(self.model, self.labels, self.pad_id)  # a head: fp32, trained in full
        self.trainable_params, self.total_params, line = trainable_parameter_summary(self.model)
        self.log(line)
        if cfg.train.gradient_checkpointing:
            enable_checkpointing(self.model)
        self.model.train()
        self.params = list(lora_state_dict(self.model).values()) + full
        if self.world.distributed:
            distributed.prepare_model(self.model, self.params, self.world, self.model.dtype, cfg.train.seed, self.log)

    def _start_trackers(self) -> None:
        """train.report_to's trackers (accelerate's init_trackers), with the resolved config as hyperparameters; a
        resumed run goes on in the same places from its checkpoint's step (trackers.resume_at)."""
        if not self.cfg.train.trackers or self.tracking:
            return
        trackers.resume_at(self.accelerator.log_with, self.start_step)
        self.accelerator.init_trackers(trackers.PROJECT, config=trackers.flat_config(config_to_dict(self.cfg)))
        self.tracking = True

    def end_trackers(self) -> None:
        """Close the trackers (accelerate's end_training); safe to call twice, or when none started."""
        if self.tracking:
            self.tracking = False
            self.accelerator.end_training()

    def _apply_lora(self) -> None:
        lora = self.cfg.lora
        apply_lora(self.model, lora.targets, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                   use_rslora=lora.use_rslora)
        if lora.dropout and expert_lora_modules(self.model):
            self.log(f"lora.dropout {lora.dropout:g}: on the linear layers only (expert weights have none, as in PEFT)")

    def _make_optimizer(self) -> None:
        train_cfg = self.train_cfg
        optimizer = make_optimizer(train_cfg.optimizer, self.params, train_cfg.lr, train_cfg.weight_decay)
        objective = self.task.loss_module(self.model, train_cfg.loss_chunk_size)
        self.loss_model, self.optimizer = ((objective, optimizer) if self.world.distributed  # no DDP wrapper:
                                           else self.accelerator.prepare(objective, optimizer))  # see distributed.py

    def _resume(self) -> None:
        found = ckpt.latest_checkpoint(self.out, warn=self.log)
        if found is None:
            self.log(f"resume: no complete checkpoint in {self.out / CHECKPOINTS_DIR}: starting from step 0")
            return
        folder, state = found
        adapter = read_adapter(folder)
        if set(adapter.weights) | set(adapter.experts) != set(lora_layers(self.model)):
            raise UserError(f"{folder}: its LoRA modules differ from this config's lora.targets: resume with the "
                            f"config in {self.out / RUN_CONFIG_FILE}")
        copy_weights_into(self.model, adapter)  # LoRA and a classifier's head (modules_to_save)
        ckpt.load_optimizer_state(folder, self.optimizer)
        step = int(state["step"])
        if step > self.max_steps:
            raise UserError(f"out={self.out}: its newest checkpoint is at step {step}, past this config's "
                            f"{self.max_steps} steps: raise train.max_steps to go on, or choose another out to "
                            f"start a new run")
        distributed.restore_rng(state, self.world, self.cfg.train.seed, step, self.log)
        if self.cfg.data.streaming:
            if "stream" not in state:
                raise UserError(f"{folder}: this checkpoint has no stream position (its run did not use "
                                f"data.streaming): resume with data.streaming=false")
            self.train_examples.seek(state["stream"])
        self.log(f"resumed from {folder} (step {step})")
        if state.get("max_steps") not in (None, self.max_steps) and step < self.max_steps:
            self.log(f"note: the checkpoint belongs to a run of {state['max_steps']} steps, this one has "
                     f"{self.max_steps}: the learning-rate schedule changes from here on")
        self.start_step, self.skipped = step, int(state.get("skipped_steps", 0))
        self.last_saved = step
        self.loss = float(state.get("loss", float("nan")))
        self.eval_metrics = dict(state.get("eval_metrics") or {})
        if step == self.max_steps:
            self.log(f"the run in {self.out} is already complete ({step} of {self.max_steps} steps): nothing to "
                     f"train; raise train.max_steps to go on")

    def _restore_last_metrics(self) -> None:
        """The last loss and eval of a resumed run, from metrics.jsonl where its checkpoint predates them."""
        if math.isnan(self.loss) and self.history:  # a checkpoint written before it kept its loss
            self.loss = float(self.history[-1].get("loss", float("nan")))
        if not self.eval_metrics:
            evals = [r for r in self.history if "eval_loss" in r]
            if evals:
                self.eval_metrics = {k: v for k, v in evals[-1].items() if k.startswith("eval_")}

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        """Steps start_step .. max_steps, then finish(). Asked to stop (self.stop), it saves and raises Interrupted
        at the next step boundary."""
        train_cfg = self.train_cfg
        if self.start_step >= train_cfg.max_steps:
            return self.finish()
        with phase(f"training steps {self.start_step + 1} to {train_cfg.max_steps}", self.log):
            self._loop()
        return self.finish()

    def _loop(self) -> None:
        train_cfg = self.train_cfg
        bad_in_a_row, recent = 0, []
        self.window_start = self.fit_start = time.perf_counter()
        bar = tqdm(range(self.start_step, train_cfg.max_steps), initial=self.start_step, total=train_cfg.max_steps,
                   desc="training", unit="step", disable=not self.progress, dynamic_ncols=True)
        if self.stop is not None:
            self.stop.training = True
        try:
            for step in bar:
                if self.stop is not None and self.world.any(self.stop.requested, "agreeing on a stop request"):
                    self._interrupt(step)
                bad_in_a_row, recent = self._one_step(step, bad_in_a_row, recent, bar)
                if step == self.start_step:
                    self._memory_phase("first step")
            if train_cfg.max_steps > self.start_step + 1:
                self._memory_phase("steady state")
        finally:
            if self.stop is not None:
                self.stop.training = False
            bar.close()

    def _one_step(self, step: int, bad_in_a_row: int, recent: list[float], bar) -> tuple[int, list[float]]:
        """step(), then what follows it: skip accounting, spike report, eval, metrics row, checkpoint."""
        train_cfg = self.train_cfg
        loss, grad_norm, ok = self.step(step)
        done = step + 1
        if not ok:
            bad_in_a_row += 1
            self._skip(done, loss, grad_norm, bad_in_a_row)
            return bad_in_a_row, recent
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
        return bad_in_a_row, recent

    def step(self, step: int) -> tuple[float, float, bool]:
        """Optimizer step `step` (0-based) on its micro-batches: (loss, grad_norm, ok), as training.train_step."""
        train_cfg = self.train_cfg
        shares = self._micro_batches(step)
        micro = [to_device(collate(examples, self.pad_id), self.accelerator.device) for examples, _ in shares]
        weights = [w for _, w in shares]
        self.window_tokens += int(self.world.sum([sum(w * count_tokens(mb) for mb, w in zip(micro, weights))],
                                                 "counting the step's input tokens")[0])
        self.loss, grad_norm, ok = train_step(self.loss_model, micro, self.optimizer, self.params,
                                              lr_at(step, train_cfg), train_cfg.max_grad_norm, self.accelerator,
                                              self.world, weights)
        return self.loss, grad_norm, ok

    def _micro_batches(self, step: int) -> list[tuple[list[dict], float]]:
        """(examples, weight) of each of this process's micro-batches of step `step`: its share of each global
        micro-batch read by index (one Arrow read each; distributed.rank_share), or, streaming (one process), the
        next examples in the stream."""
        if self.cfg.data.streaming:
            size = self.train_cfg.batch_size
            taken = self.train_examples.next_examples(size * self.train_cfg.grad_accum)
            return [(taken[k:k + size], 1.0) for k in range(0, len(taken), size)]
        shares = distributed.rank_share(self.batch_indices(step), self.train_cfg.batch_size, self.world)
        return [(self.train_examples.take(idx), weight) for idx, weight in shares]

    def batch_indices(self, step: int) -> list[list[int]]:
        """The train example indices of each micro-batch of optimizer step `step` (training.batch_indices)."""
        train_cfg = self.train_cfg
        return batch_indices(step, len(self.train_examples), train_cfg.batch_size, train_cfg.grad_accum,
                             train_cfg.seed, limit=self.stream_end)

    def evaluate(self) -> dict:
        """The task's metrics on the eval set ({} without one), each process evaluating its part; kept as the run's
        latest eval."""
        batch_size, device = self.train_cfg.batch_size, self.accelerator.device
        share, stand_ins = distributed.eval_share(self.eval_examples, batch_size, self.world)
        sums = self.task.eval_sums(self.loss_model, share, batch_size, self.pad_id, device)
        if stand_ins:
            stand_in_forwards(self.loss_model, self.eval_examples[0], stand_ins, self.pad_id, device)
        self.eval_metrics = self.task.eval_metrics(self.world.sum(sums, "summing the eval metrics"))
        return self.eval_metrics

    def save_checkpoint(self, done: int) -> Path:
        """checkpoints/step-NNNNNN: the adapter, the optimizer state, the RNG states and the counters (with the
        step's loss and the latest eval, which a resumed run reports)."""
        state = {**distributed.rng_states(self.world), "skipped_steps": self.skipped, "max_steps": self.max_steps,
                 "loss": self.loss, "eval_metrics": self.eval_metrics}
        if self.cfg.data.streaming:
            state["stream"] = self.train_examples.position  # where a resumed run goes on (data_stream.py)
        settings = self._adapter_settings()
        self.world.main_does(f"writing the step-{done} checkpoint", lambda: ckpt.save_checkpoint(
            self.out, done, lambda folder: write_model_adapter(self.model, folder, **settings), self.optimizer,
            state, self.train_cfg.keep_checkpoints))
        self.last_saved = done
        return ckpt.checkpoint_dir(self.out, done)

    def finish(self) -> TrainResult:
        """OUT/adapter and OUT/loss.png, the adapter's rank verdict in the log, and the result."""
        with phase(f"saving the adapter to {self.out / ADAPTER_DIR}", self.log):
            self.world.main_does("saving the adapter", self._save_adapter)
        self.end_trackers()
        self.log(f"adapter: {verdict(model_spectra(self.model))}; "
                 f"details: qlora-trainer inspect {self.out / ADAPTER_DIR}")
        self._memory_phase("save")
        return TrainResult(self.out, self.max_steps, self.loss, self.eval_metrics.get("eval_loss"),
                           self.skipped, self.history, self.eval_metrics, self.trainable_params, self.total_params,
                           resumed_from=self.start_step)

    def _save_adapter(self) -> None:
        save_adapter(self.model, self.out / ADAPTER_DIR, **self._adapter_settings())
        plot_losses(self.history, self.out / LOSS_PLOT_FILE)

    # ------------------------------------------------------------------ helpers of the loop
    def _skip(self, done: int, loss: float, grad_norm: float, bad_in_a_row: int) -> None:
        """A step whose loss or gradient was not finite: counted; max_bad_steps in a row save and stop."""
        self.skipped += 1
        self.log(f"step {done}: non-finite loss/gradient (loss={loss}, grad_norm={grad_norm}): update skipped")
        if bad_in_a_row >= self.train_cfg.max_bad_steps:
            path = self.save_checkpoint(done)
            raise UserError(f"{bad_in_a_row} steps in a row had a NaN/inf loss or gradient (last at step {done}); "
                            f"stopped. The last good adapter is in {path}. Lower train.lr or check the data.")

    def _interrupt(self, done: int) -> None:
        """Asked to stop with `done` steps done: a checkpoint at `done` (unless there is one) and OUT/adapter, then
        Interrupted."""
        checkpoint = None
        if done > self.last_saved:
            checkpoint = self.save_checkpoint(done)
        elif done > 0:
            checkpoint = ckpt.checkpoint_dir(self.out, done)
        if done > 0:
            with phase(f"stopping after step {done}: saving the adapter to {self.out / ADAPTER_DIR}", self.log):
                self.world.main_does("saving the adapter", self._save_adapter)
        raise Interrupted(self.out, done, self.max_steps, self.stop.signum, checkpoint)

    def _log_row(self, step: int, grad_norm: float, evaluated: bool, bar) -> None:
        """One row of metrics.jsonl, and the progress bar's fields or (without a bar) a plain progress line."""
        elapsed = time.perf_counter() - self.window_start
        row = {"step": step + 1, "loss": round(self.loss, 6), "lr": lr_at(step, self.train_cfg),
               "grad_norm": round(grad_norm, 6), "tokens_per_s": round(self.window_tokens / max(elapsed, 1e-9), 1),
               "mem_gb": round(memory_gb(), 3)}
        if evaluated:
            row.update(self.eval_metrics)  # eval_loss (+ eval_accuracy, eval_f1 for a classifier)
        self.history.append(row)
        if self.world.is_main:
            append_metric(self.out, row)
        if self.tracking:  # the same row, at the same step, to train.report_to's trackers
            self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        fields = {"loss": f"{self.loss:.4f}", "lr": f"{row['lr']:.2e}", "tok/s": f"{row['tokens_per_s']:.0f}",
                  "mem": f"{row['mem_gb']:.2f}GB"}
        if "eval_loss" in self.eval_metrics:  # the latest eval, until the next one
            fields["eval_loss"] = f"{self.eval_metrics['eval_loss']:.4f}"
        fields.update(self.task.progress_fields(self.eval_metrics))
        if self.progress:
            bar.set_postfix(ordered_dict=fields)
        else:
            done, now = step + 1, time.perf_counter()
            rate = (now - self.fit_start) / max(done - self.start_step, 1)  # seconds a step in this process
            self.log(training_line(done, self.max_steps, fields, rate * (self.max_steps - done)))
        self.window_tokens, self.window_start = 0, time.perf_counter()

    def _memory_phase(self, name: str) -> None:
        """End a phase of host_memory's log, and keep the phases so far in OUT/host_memory.json once OUT exists. The
        heap's free blocks go back to the OS first (malloc_trim): the next phase starts from what is really held."""
        libc.malloc_trim()
        self.memory.end_phase(name)
        if self.out.is_dir() and self.world.is_main:  # the main process alone writes into OUT
            self.memory.write(self.out / HOST_MEMORY_FILE)

    def _adapter_settings(self) -> dict:
        return dict(base_model_name_or_path=str(self.cfg.model.path), **self.task.adapter_settings(self.model))

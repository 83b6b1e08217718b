"""Training on more than one process (`accelerate launch`): who does what, and the few collectives the loop needs.

The rules (README "More than one GPU"):
- train.batch_size is the whole micro-batch, across all processes: rank r trains the r-th slice of it
  (rank_share). The data order stays a function of (seed, epoch, step), so a run trains the same model on any
  number of processes (to float tolerance: only the order of the sums changes).
- The loss is a mean over the trained tokens of the whole step, all ranks together: each rank divides by the
  global count (World.sum), and the LoRA gradients are summed across ranks after the last micro-batch
  (World.sum_grads), so N ranks x b equals 1 process x N*b.
- Each rank evaluates a contiguous 1/N of the eval set (eval_share) and the tasks' eval sums are added (World.sum):
  the metrics are the one-process ones. A rank with fewer batches runs stand-in forwards so every rank runs as
  many (FSDP gathers parameters inside each).
- Only the main process writes into OUT (lock, config, metrics, checkpoints, adapter, plot): World.main_does runs
  the write there and hands its outcome, success or the error, to every rank, so no rank waits on a main process
  that failed.
- FSDP (an accelerate config with distributed_type FSDP): the frozen base is sharded with FSDP2's fully_shard, NF4
  weights stored in the compute dtype (quant.store_as); the trained parameters are left out of the sharding, so
  every rank holds all of them (a few MB), the optimizer is the one-process optimizer and a checkpoint is the
  one-process checkpoint.
- A collective that waits longer than train.ddp_timeout, or whose peer died, is one UserError naming the rank.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from qlora_trainer import checkpoint as ckpt
from qlora_trainer import quant
from qlora_trainer.errors import UserError

FSDP_ENV = "ACCELERATE_USE_FSDP"  # set by `accelerate launch` from a config with distributed_type: FSDP
_FAILED = "failed"


@dataclass(frozen=True)
class World:
    """This process's place in the launch: rank of size, and whether the launch asked for FSDP."""

    rank: int = 0
    size: int = 1
    fsdp: bool = False
    timeout_s: float = 1800.0

    @classmethod
    def from_env(cls, timeout_s: float = 1800.0) -> World:
        """The launcher's environment (accelerate launch and torchrun set RANK and WORLD_SIZE)."""
        size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        rank = int(os.environ.get("RANK", "0") or 0)
        fsdp = size > 1 and os.environ.get(FSDP_ENV, "").lower() in ("1", "true")
        return cls(rank, size, fsdp, timeout_s)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.size}"

    # ------------------------------------------------------------------ collectives (no-ops on one process)
    def _call(self, what: str, collective):
        try:
            return collective()
        except (RuntimeError, dist.DistError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"{self}: {what}: the other processes did not answer within train.ddp_timeout="
                            f"{self.timeout_s:g}s, or one of them has ended ({first}); see the other ranks' "
                            "output for the first error, then resume with --resume") from None

    def sum(self, values: list[float], what: str) -> list[float]:
        """The element-wise sum of `values` over all ranks (float64: token counts stay exact)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        self._call(what, lambda: dist.all_reduce(tensor))
        return tensor.tolist()

    def any(self, flag: bool, what: str) -> bool:
        """True on every rank if it is true on one (a stop request must stop all ranks at the same step)."""
        return bool(self.sum([float(flag)], what)[0])

    def sum_grads(self, params: list[nn.Parameter]) -> None:
        """Sum each parameter's gradient over all ranks, in one flat all-reduce (a rank without a gradient adds 0)."""
        if not self.distributed:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        self._call("summing the gradients", lambda: dist.all_reduce(flat))
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n

    def broadcast_params(self, params: list[nn.Parameter]) -> None:
        """Every rank starts from the main process's trained parameters (LoRA init and a resumed checkpoint)."""
        if not self.distributed:
            return
        for p in params:
            self._call("sharing the initial parameters", lambda p=p: dist.broadcast(p.data, src=0))

    def gather(self, obj, what: str) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.distributed:
            return [obj]
        gathered = [None] * self.size
        self._call(what, lambda: dist.all_gather_object(gathered, obj))
        return gathered

    def main_does(self, what: str, action):
        """Run `action` on the main process alone and return its result there (None elsewhere). Every rank learns
        the outcome: an error on the main process is raised on it as it is, and on the others as a UserError
        that says what failed, so no rank waits for a main process that has given up."""
        if not self.distributed:
            return action()
        outcome, result, error = [None], None, None
        if self.is_main:
            try:
                result = action()
            except BaseException as err:  # noqa: BLE001 - handed on, then raised again below
                error, outcome[0] = err, f"{_FAILED}: {err}"
        self._call(what, lambda: dist.broadcast_object_list(outcome, src=0))
        if error is not None:
            raise error
        if outcome[0] is not None:
            raise UserError(f"{self}: stopped because the main process failed while {what}: {outcome[0]}")
        return result


def _collective_device() -> torch.device:
    """Where a small tensor must be for a collective: NCCL reduces only GPU tensors, gloo CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def quiet(_line: str) -> None:
    """The log of a rank that is not the main process: the main process speaks for the run."""


def accelerate_kwargs(world: World) -> list:
    """The process group's watchdog: a collective gives up after train.ddp_timeout seconds."""
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(timeout=timedelta(seconds=world.timeout_s))] if world.distributed else []


def prepare_model(model: nn.Module, trained: list[nn.Parameter], world: World, compute_dtype: torch.dtype,
                  seed: int, log) -> None:
    """After LoRA is applied: every rank takes the main process's trained parameters, FSDP shards the base (when the
    launch asked for it), and each rank gets its own random stream (dropout)."""
    world.broadcast_params(trained)
    if world.fsdp:
        before = nf4_bytes(model)
        shard_base(model, trained, compute_dtype)
        shares = world.gather(nf4_bytes(model), "counting the NF4 shards")
        log(f"FSDP: the NF4 base is sharded over {world.size} processes: "
            + ", ".join(f"rank {r} holds {b / before:.1%} ({b:,} bytes)" for r, b in enumerate(shares))
            + f" of its {before:,} packed bytes")
    seed_rank(seed, 0, world)


# ------------------------------------------------------------------------------------------ the data

def check_batch(batch_size: int, world: World, resuming: bool = False) -> None:
    """train.batch_size (the whole micro-batch) must split evenly: each rank trains batch_size / N examples."""
    if world.size == 1 or batch_size % world.size == 0:
        return
    fits = [n for n in range(1, batch_size + 1) if batch_size % n == 0]
    what = ("a per-process batch of 0" if batch_size < world.size
            else f"{batch_size / world.size:g} examples a process")
    resume = (" A checkpoint resumes on any number of processes that divides train.batch_size (its state is the "
              "global batch and the data position)." if resuming else "")
    raise UserError(f"train.batch_size={batch_size} is the micro-batch of all {world.size} processes together, "
                    f"which would give {what}: launch with --num_processes {' or '.join(map(str, fits))}, or set "
                    f"train.batch_size to a multiple of {world.size}.{resume}")


def rank_share(micro_batches: list[list[int]], batch_size: int, world: World) -> list[tuple[list[int], float]]:
    """This rank's slice of each global micro-batch, with its weight: rank r takes positions [r*b, (r+1)*b),
    b = batch_size / N. A short last micro-batch (train.epochs) can leave a rank nothing: it then runs the micro-
    batch's first example with weight 0, so every rank runs the same forwards and backwards (FSDP gathers
    parameters inside them) and adds nothing to the step."""
    per = batch_size // world.size
    shares = []
    for mb in micro_batches:
        mine = mb[world.rank * per:(world.rank + 1) * per] if world.distributed else mb
        shares.append((mine, 1.0) if mine else (mb[:1], 0.0))
    return shares


class Share(Sequence):
    """examples[rows] read lazily, `rows` a range: one process's part of the eval set."""

    def __init__(self, examples: Sequence, rows: range):
        self.examples, self.rows = examples, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            picked = self.rows[i]
            return self.examples[picked.start:picked.stop] if picked.step == 1 else [self.examples[j] for j in picked]
        return self.examples[self.rows[i]]


def eval_share(examples: Sequence, batch_size: int, world: World) -> tuple[Sequence, int]:
    """This rank's contiguous part of the eval examples, and how many stand-in batches it runs after them: every
    rank runs as many forwards as the rank with the most batches, because FSDP gathers parameters inside each."""
    if not world.distributed:
        return examples, 0
    n = len(examples)
    bounds = [n * r // world.size for r in range(world.size + 1)]
    batches = [math.ceil((b - a) / batch_size) for a, b in zip(bounds, bounds[1:])]
    return Share(examples, range(bounds[world.rank], bounds[world.rank + 1])), max(batches) - batches[world.rank]


# ------------------------------------------------------------------------------------------ RNG per rank

def rng_states(world: World) -> dict:
    """A checkpoint's RNG fields: `rng` (the main process's, as one process writes it), and with more than one
    process `rng_ranks` (every rank's, in rank order) and `world_size`."""
    own = ckpt.rng_state()
    if not world.distributed:
        return {"rng": own}
    states = world.gather(own, "gathering the RNG states")
    return {"rng": states[0], "rng_ranks": states, "world_size": world.size}


def restore_rng(state: dict, world: World, seed: int, step: int, log) -> None:
    """Each rank's RNG state from a checkpoint of the same number of processes; from one of another number, each
    rank seeds a fresh stream from (seed, step, rank): the data, the loss and the updates do not depend on it, only
    LoRA dropout's masks, which then differ from an uninterrupted run's."""
    saved = int(state.get("world_size", 1))
    if saved == world.size:
        ckpt.set_rng_state(state["rng_ranks"][world.rank] if world.distributed else state["rng"])
        return
    seed_rank(seed, step, world)
    log(f"note: the checkpoint was written by {saved} process(es), this run has {world.size}: the data order, "
        "loss and updates go on as they would have; LoRA dropout draws new random masks from here on")

def seed_rank(seed: int, step: int, world: World) -> None:
    """Each rank its own random stream (LoRA dropout must not draw the same masks on every rank), a function of
    (seed, step, rank): used at the start of a multi-process run and when a checkpoint of another size resumes."""
    value = (seed * 1_000_003 + step) * 1_009 + world.rank
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


# ------------------------------------------------------------------------------------------ FSDP

def shard_base(model: nn.Module, trained: list[nn.Parameter], compute_dtype: torch.dtype) -> None:
    """FSDP2 over the frozen base: each decoder layer (the model's _no_split_modules), then the body around them
    (embeddings, final norm) and the output layer as units of their own, because the loss (loss.py) calls the body
    and the output layer separately. NF4 weights are relabelled as compute-dtype storage first. `trained` stays out
    of the sharding (every rank keeps all of it, its gradients summed by World.sum_grads), and so does an output
    layer tied to the embeddings (one tensor cannot live in two units)."""
    from torch.distributed.fsdp import fully_shard

    quant.store_as(model, compute_dtype)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    ignored = set(trained) | ({head.weight} if tied else set())
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.base_model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, ignored_params=ignored)
    fully_shard(model.base_model, ignored_params=ignored)
    if head is not None and not tied and not ignored.issuperset(head.parameters()):
        fully_shard(head, ignored_params=ignored)


def nf4_bytes(model: nn.Module) -> int:
    """Packed NF4 bytes this process holds (its shard under FSDP)."""
    return sum(quant.packed_bytes(m) for m in model.modules() if quant.is_nf4_linear(m))

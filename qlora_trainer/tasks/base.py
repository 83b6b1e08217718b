"""The interface every task implements, and the evaluation plumbing the tasks share."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from qlora_trainer.adapter import Adapter
from qlora_trainer.data import collate

# Prompts `merge --verify` compares the merged model on (a classifier classifies them).
VERIFY_TEXTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n",
                "Once upon a time, in a small village by the sea,", "Question: what is 17 * 23? Answer:"]


class Task:
    """One kind of model we fine-tune. Subclasses set `name` (model.task) and `peft_task_type` (adapter_config's
    task_type) and implement loss_module, evaluate, load_with_adapter and verify_merged."""

    name: str
    peft_task_type: str

    # ------------------------------------------------------------------ training
    def head_labels(self, num_labels: int | None, stats) -> list[str] | None:
        """The label names of a head this task adds to the model (None: no head)."""
        return None

    def model_kwargs(self, *, labels: list[str] | None = None, adapter: Adapter | None = None) -> dict:
        """load_quantized / build_empty_model keywords for this task's model: for `labels`, or for `adapter`."""
        return {"task": self.name}

    def prepare_model(self, model: nn.Module, labels: list[str] | None, pad_token_id: int | None) -> list[nn.Parameter]:
        """Ready a freshly loaded model for training; returns parameters trained in full beside LoRA (a head)."""
        return []

    def loss_module(self, model: nn.Module, loss_chunk_size: int) -> nn.Module:
        """forward(**batch) -> (summed loss, count it is a sum over)."""
        raise NotImplementedError

    def evaluate(self, loss_model: nn.Module, examples: Sequence[dict], batch_size: int, pad_id: int, device) -> dict:
        """{eval_loss, ...} over `examples` ({} when there are none)."""
        return self.eval_metrics(self.eval_sums(loss_model, examples, batch_size, pad_id, device))

    def eval_sums(self, loss_model: nn.Module, examples: Sequence[dict], batch_size: int, pad_id: int,
                  device) -> list[float]:
        """Sums over `examples` that eval_metrics turns into metrics: the sums of parts of an eval set, added, are
        those of the whole set (how processes share an evaluation)."""
        raise NotImplementedError

    def eval_metrics(self, sums: list[float]) -> dict:
        """{eval_loss, ...} from eval_sums ({} when they count no example)."""
        raise NotImplementedError

    def progress_fields(self, metrics: dict) -> dict:
        """Extra progress-bar fields of the last eval."""
        return {}

    def summary(self, metrics: dict) -> str:
        """Extra words for the final line of `train` (", eval accuracy ...")."""
        return ""

    # ------------------------------------------------------------------ adapters and merge
    def adapter_settings(self, model: nn.Module) -> dict:
        """save_adapter / write_model_adapter keywords for this task's adapter."""
        return {"task_type": self.peft_task_type}

    def load_with_adapter(self, base, adapter_dir: str | os.PathLike, *, compute_dtype=None, device=None,
                          progress: bool = False) -> tuple[nn.Module, Adapter]:
        """(model, adapter): the NF4 base with the adapter applied, frozen, in eval mode."""
        raise NotImplementedError

    def merged_config(self, raw: dict, adapter: Adapter) -> dict:
        """config.json of a merged model, from the base's."""
        return raw

    def verify_merged(self, base, adapter_dir: str | os.PathLike, merged: str | os.PathLike, *,
                      texts: list[str] | None = None, device=None) -> dict:
        """Logits of quantized base + adapter vs the merged folder loaded by plain transformers (fp32):
        {max_abs_diff, mean_abs_diff, top1_agreement, positions}."""
        raise NotImplementedError


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the block; the module's mode is restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def batches(examples: Sequence[dict], batch_size: int, pad_id: int, device) -> Iterator[dict]:
    """Collated batches of `examples` in order, on `device`."""
    for start in range(0, len(examples), batch_size):
        yield {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}


def stand_in_forwards(loss_model: nn.Module, example: dict, count: int, pad_id: int, device) -> None:
    """`count` forwards of `example` whose results are dropped: a process with fewer eval batches than another runs
    them so that all run as many forwards (distributed.eval_share)."""
    batch = next(batches([example], 1, pad_id, device))
    with evaluating(loss_model):
        for _ in range(count):
            loss_model(**batch)

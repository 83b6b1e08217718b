"""The causal-LM task: next-token loss over the trained tokens (loss.py's chunked cross-entropy), eval loss."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from qlora_trainer.adapter import Adapter, load_adapter_into
from qlora_trainer.loading import load_quantized, resolve_device
from qlora_trainer.loss import CausalLMLoss
from qlora_trainer.names import CAUSAL_LM, PEFT_TASK_TYPES
from qlora_trainer.tasks.base import VERIFY_TEXTS, Task, batches, evaluating


class CausalLM(Task):
    name = CAUSAL_LM
    peft_task_type = PEFT_TASK_TYPES[CAUSAL_LM]

    def loss_module(self, model: nn.Module, loss_chunk_size: int) -> nn.Module:
        return CausalLMLoss(model, loss_chunk_size)

    def eval_sums(self, loss_model: nn.Module, examples, batch_size: int, pad_id: int, device) -> list[float]:
        """[summed loss, trained tokens, examples]."""
        total, tokens = 0.0, 0
        with evaluating(loss_model):
            for batch in batches(examples, batch_size, pad_id, device):
                summed, n = loss_model(**batch)
                total += float(summed)
                tokens += n
        return [total, float(tokens), float(len(examples))]

    def eval_metrics(self, sums: list[float]) -> dict:
        """{eval_loss}: the mean loss per trained token."""
        total, tokens, examples = sums
        return {"eval_loss": round(total / max(tokens, 1), 6)} if examples else {}

    def load_with_adapter(self, base, adapter_dir: str | os.PathLike, *, compute_dtype=None, device=None,
                          progress: bool = False) -> tuple[nn.Module, Adapter]:
        model = load_quantized(base, compute_dtype=compute_dtype, device=device, progress=progress)
        return model, load_adapter_into(model, adapter_dir)

    @torch.no_grad()
    def verify_merged(self, base, adapter_dir: str | os.PathLike, merged: str | os.PathLike, *,
                      texts: list[str] | None = None, device=None) -> dict:
        from transformers import AutoModelForCausalLM

        ours, _ = self.load_with_adapter(base, adapter_dir, compute_dtype="fp32", device=resolve_device(device))
        dev = next(ours.parameters()).device
        ref = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).to(dev).eval()
        max_diff, total_diff, agree, positions = 0.0, 0.0, 0, 0
        for ids in _verify_prompts(Path(merged), ours.config.vocab_size, texts):
            ids = ids.to(dev)[None]  # (1, T)
            a, b = ours(ids).logits.float()[0], ref(ids).logits.float()[0]  # (T, V)
            diff = (a - b).abs()
            max_diff = max(max_diff, diff.max().item())
            total_diff += diff.mean(-1).sum().item()
            agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
            positions += ids.shape[1]
        return {"max_abs_diff": max_diff, "mean_abs_diff": total_diff / positions,
                "top1_agreement": agree / positions, "positions": positions}


def _verify_prompts(model_dir: Path, vocab_size: int, texts: list[str] | None) -> list[torch.Tensor]:
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        tokenizer = None
    if tokenizer is None:  # no tokenizer shipped: fixed random token ids
        gen = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab_size, (24,), generator=gen) for _ in range(4)]
    prompts = []
    for text in texts or VERIFY_TEXTS:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        prompts.append(ids.clamp(max=vocab_size - 1))
    return prompts

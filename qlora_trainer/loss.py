"""Causal-LM loss computed by us from the final hidden states, a chunk of tokens at a time.

transformers' own loss first builds the (batch, seq, vocab) logits and an fp32 copy of them: for Llama-3
(vocab 128K) at 8K tokens that is 4 GiB+ of activations that exist only to be reduced to one number. Here
only the trained tokens (label != -100) reach lm_head, in chunks; each chunk's logits are recomputed in
the backward pass (activation checkpointing per chunk), so no chunk's logits outlive its own loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qlora_trainer.names import IGNORE_INDEX


def _chunk_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> torch.Tensor:
    logits = head(hidden).float()  # (chunk, vocab): cross-entropy in fp32 whatever the compute dtype
    return F.cross_entropy(logits, labels, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                          chunk_size: int = 1024) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy and the number of trained tokens.

    hidden: (B, T, H) final (normed) hidden states; labels: (B, T) aligned with the input ids, so the
    hidden state at t-1 predicts labels[t] (transformers' convention)."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-1), H)
    y = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    keep = (y != IGNORE_INDEX).nonzero().squeeze(1)
    h, y = h.index_select(0, keep), y.index_select(0, keep)  # (N, H), (N,): only tokens with a loss
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, y.numel(), chunk_size):
        hc, yc = h[start:start + chunk_size], y[start:start + chunk_size]
        if torch.is_grad_enabled() and hc.requires_grad:
            total = total + checkpoint(_chunk_loss, hc, yc, head, use_reentrant=False)
        else:
            total = total + _chunk_loss(hc, yc, head)
    return total, y.numel()


class CausalLMLoss(nn.Module):
    """Wraps a transformers causal LM: forward(batch) -> (summed loss, trained tokens), never full logits.

    A module (rather than a function) so that accelerate/DDP can wrap the whole computation."""

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False)
        return chunked_cross_entropy(out.last_hidden_state, self.model.get_output_embeddings(), labels,
                                     self.chunk_size)

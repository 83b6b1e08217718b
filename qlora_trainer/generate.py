"""Sampling with the adapter on the quantized base: a small decode loop over a KV cache, streaming text as it comes.

    prompt -> chat template (when the tokenizer has one) -> ids -> prefill -> one token at a time until EOS

Our own loop rather than `model.generate`: the sampling rules are a few lines we can read (temperature 0 is
greedy; else softmax(logits / T), nucleus top-p, a seeded generator that leaves the global RNG alone) and no
generation_config default (top_k=50, repetition penalty, ...) slips in unseen.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoTokenizer, DynamicCache, PreTrainedTokenizerBase

from qlora_trainer.adapter import load_adapter_into
from qlora_trainer.base_model import BaseModel, resolve_base
from qlora_trainer.errors import UserError
from qlora_trainer.loading import load_quantized

Message = dict[str, str]


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list[Message], *,
                  chat: bool | None = None) -> list[int]:
    """Token ids for a prompt: a string is wrapped as one user message when the tokenizer has a chat template
    (chat=None: if it has one), a list of messages always goes through the template. The rendered template
    already holds the BOS, so no second one is added; a plain string gets the tokenizer's usual specials."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    use_chat = has_template if chat is None else chat
    if isinstance(prompt, list) or use_chat:
        if not has_template:
            raise UserError("this tokenizer has no chat template: pass a plain prompt (and no --chat), or use a "
                            "model folder whose tokenizer_config.json / chat_template.jinja defines one")
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids


def eos_ids(model, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every id that ends a turn: the tokenizer's EOS and the model's generation_config eos_token_id(s)."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids


def next_token(logits: torch.Tensor, *, temperature: float, top_p: float,
               generator: torch.Generator | None) -> int:
    """One token from the last position's logits (V,): argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (V,)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs[before >= top_p] = 0.0  # keep the smallest prefix whose mass reaches top_p (at least one)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], *, max_new_tokens: int, eos: set[int], temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None,
                 on_token: Callable[[int], None] | None = None) -> list[int]:
    """New token ids after `prompt_ids`, stopping after max_new_tokens or at an EOS (which is not returned)."""
    if not prompt_ids:
        raise UserError("the prompt is empty after tokenization")
    device = next(model.parameters()).device
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt_ids], device=device)  # (1, T) prefill, then (1, 1) per step
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]  # (V,)
        token = next_token(logits, temperature=temperature, top_p=top_p, generator=generator)
        if token in eos:
            break
        out.append(token)
        if on_token is not None:
            on_token(token)
        ids = torch.tensor([[token]], device=device)
    return out


class _TextStream:
    """Turns token ids into text pieces as they come: decodes the whole reply so far and emits the new suffix,
    holding back an incomplete UTF-8 character (a lone "\ufffd") until its remaining bytes arrive. `finish()`
    emits what is still held back when generation stops mid-character, so the pieces add up to the reply."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, emit: Callable[[str], None]):
        self.tokenizer, self.emit = tokenizer, emit
        self.ids: list[int] = []
        self.sent = 0

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        self._emit_new(hold_partial=True)

    def finish(self) -> None:
        self._emit_new(hold_partial=False)

    def _emit_new(self, *, hold_partial: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if hold_partial and text.endswith("\ufffd"):
            return
        if len(text) > self.sent:
            self.emit(text[self.sent:])
            self.sent = len(text)


def generate(model, tokenizer: PreTrainedTokenizerBase, prompt: str | list[Message], *, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = 0,
             stream: Callable[[str], None] | None = None, chat: bool | None = None) -> str:
    """The model's reply to `prompt` (a string, or a list of chat messages), without the prompt or the EOS.

    stream: called with each new piece of text as it is generated (e.g. `lambda s: print(s, end="", flush=True)`).
    chat: wrap a string prompt in the chat template (None: when the tokenizer has one)."""
    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 0:
        raise UserError(f"need temperature >= 0 (got {temperature}), 0 < top_p <= 1 (got {top_p}) and "
                        f"max_new_tokens >= 0 (got {max_new_tokens})")
    prompt_ids = render_prompt(tokenizer, prompt, chat=chat)
    on_token = _TextStream(tokenizer, stream) if stream is not None else None
    new = generate_ids(model, prompt_ids, max_new_tokens=max_new_tokens, eos=eos_ids(model, tokenizer),
                       temperature=temperature, top_p=top_p, seed=seed, on_token=on_token)
    if on_token is not None:
        on_token.finish()
    return tokenizer.decode(new, skip_special_tokens=True)


def load_for_generation(base: str | os.PathLike | BaseModel, adapter: str | os.PathLike | None = None, *,
                        compute_dtype: str | None = None, device: str | None = None):
    """(model, tokenizer): the NF4 base with the adapter applied, and the tokenizer for it (tokenizer_dir)."""
    base = resolve_base(base)
    model = load_quantized(base, compute_dtype=compute_dtype, device=device, progress=False)
    if adapter is not None:
        load_adapter_into(model, adapter)
    return model, load_tokenizer_from(tokenizer_dir(base, adapter))


def tokenizer_dir(base: BaseModel, adapter: str | os.PathLike | None = None) -> Path:
    """The tokenizer saved with the adapter if there is one (a chat template added in training), else the base's."""
    if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file():
        return Path(adapter)
    return base.path


def load_tokenizer_from(folder: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise UserError(f"{folder}: no usable tokenizer here ({err}): generate needs the tokenizer files "
                        "(tokenizer.json / tokenizer_config.json) in the model folder") from None

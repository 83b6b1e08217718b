"""Datasets: read rows (through `datasets`), render each format, mask the prompt, pack, collate.

A tokenized example is {"input_ids": [...], "labels": [...]} with labels aligned to input_ids (the usual
transformers convention: the logits at position t-1 predict labels[t]); -100 marks tokens with no loss.
Invariants kept for every causal-LM example:
  * it ends with the EOS token and that EOS is trained (label = eos id), unless it was truncated;
  * at most one BOS at the start (none added when the rendered text already starts with it);
  * labels[0] is always -100, so a packed row never trains one example's first token on the previous one.
Classification examples are {"input_ids": [...], "labels": int}.

Packed rows add "position_ids" restarting at 0 for every example. transformers (masking_utils:
find_packed_sequence_indices) turns restarting position_ids into a block-diagonal causal mask, but only when
attention_mask is None and no cache is used, so a packed batch from `collate` carries position_ids and no
attention_mask; its right padding forms a segment of its own that no real token can attend to (causal).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from qlora_trainer.atomic import human_bytes
from qlora_trainer.config import DataConfig
from qlora_trainer.data_sources import FILE_BUILDERS, load_rows  # noqa: F401 (where rows are read; kept importable here)
from qlora_trainer.errors import UserError
from qlora_trainer.names import CLASSIFICATION, IGNORE_INDEX

if TYPE_CHECKING:
    from qlora_trainer.base_model import BaseModel

logger = logging.getLogger(__name__)

FORMAT_FIELDS = {  # required fields, and the help shown when one is missing
    "text": (("text",), "text"),
    "alpaca": (("instruction", "output"), "instruction, output[, input]"),
    "completion": (("prompt", "completion"), "prompt, completion"),
    "chat": (("messages",), "messages: a list of {role, content}"),
    CLASSIFICATION: (("text", "label"), "text, label"),
}
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class RowError(Exception):
    """A problem with one row; build_datasets turns it into a UserError naming the file and row number."""


@dataclass
class DataStats:
    rows: int = 0                # rows read from the files (train + eval)
    train_examples: int = 0      # tokenized train examples kept (before packing)
    eval_examples: int = 0
    truncated: int = 0           # examples cut to max_seq_len (train + eval)
    dropped: int = 0             # rows dropped because no token was left to train on (train + eval)
    lengths: Sequence[int] = field(default_factory=list)  # token length of each kept train example
    trained_tokens: int = 0      # train tokens with a label
    packed_rows: int | None = None  # train rows after packing (None: no packing)
    label_names: list[str] | None = None  # classification: label id -> name
    cache: str | None = None     # the token cache entry these examples were read from (data_cache.py)
    cache_reused: bool = False   # True: read from the cache; False: tokenized now and written there
    build_seconds: float = 0.0   # how long tokenizing took when the entry was built
    cache_removed: tuple[int, int] = (0, 0)  # (entries, bytes) of old cache entries the build removed

    def summary(self) -> str:
        lines = [f"rows read: {self.rows}; train examples: {self.train_examples}; eval examples: {self.eval_examples}"]
        if len(self.lengths):
            lens = np.asarray(self.lengths)
            # A classifier trains on one label per example, not on tokens: its count is the train examples above.
            trained = f"; trained tokens: {self.trained_tokens}" if self.label_names is None else ""
            lines.append(f"train tokens per example: min {lens.min()}, mean {lens.mean():.1f}, "
                         f"median {float(np.median(lens)):g}, max {lens.max()}{trained}")
        lines.append(f"truncated to max_seq_len: {self.truncated}; dropped (nothing left to train on): {self.dropped}")
        if self.packed_rows is not None:
            lines.append(f"packed into {self.packed_rows} rows")
        if self.label_names is not None:
            lines.append(f"labels: {', '.join(f'{i}={n}' for i, n in enumerate(self.label_names))}")
        return "\n".join(lines)


# -------------------------------------------------------------------------------------------- tokenizing

def load_tokenizer(model: str | os.PathLike | BaseModel, *, trust_remote_code: bool = False):
    """AutoTokenizer of a model folder (or a resolved BaseModel): local files only, remote code only if allowed."""
    from transformers import AutoTokenizer

    from qlora_trainer.base_model import BaseModel  # noqa: F811 (torch-heavy: imported when a tokenizer is loaded)

    path, name = (model.path, model.name) if isinstance(model, BaseModel) else (model, model)
    if isinstance(model, BaseModel):
        trust_remote_code = model.trust_remote_code
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0]
        raise UserError(f"cannot load a tokenizer from model.path {name}: {reason}") from err


def uses_bos(tokenizer) -> bool:
    """True when the tokenizer itself puts a BOS in front of plain text (Llama: yes; GPT-2, Qwen2: no)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def pad_token_id(tokenizer) -> int:
    """Id used for padding; its value never matters (padding is masked by attention mask / labels)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0


def _field(row: dict, name: str, fmt: str, optional: bool = False):
    value = row.get(name)
    if value is None:
        if optional:
            return ""
        raise RowError(f"missing field '{name}' (format {fmt} needs {FORMAT_FIELDS[fmt][1]})")
    if not isinstance(value, str):
        raise RowError(f"field '{name}' must be a string, got {type(value).__name__}")
    return value


def _segments(row: dict, fmt: str, tokenizer) -> list[tuple[str, bool]]:
    """Row -> text pieces in order, each (text, is_response)."""
    if fmt == "text":
        return [(_field(row, "text", fmt), True)]
    if fmt == "alpaca":
        instruction, output = _field(row, "instruction", fmt), _field(row, "output", fmt)
        extra = _field(row, "input", fmt, optional=True)
        prompt = (ALPACA_WITH_INPUT if extra.strip() else ALPACA_NO_INPUT).format(instruction=instruction, input=extra)
        return [(prompt, False), (output, True)]
    if fmt == "completion":
        return [(_field(row, "prompt", fmt), False), (_field(row, "completion", fmt), True)]
    if fmt == "chat":
        return _chat_segments(row, tokenizer)
    raise ValueError(f"no segments for format {fmt}")


def _chat_segments(row: dict, tokenizer) -> list[tuple[str, bool]]:
    messages = row.get("messages")
    if messages is None:
        raise RowError(f"missing field 'messages' (format chat needs {FORMAT_FIELDS['chat'][1]})")
    if not isinstance(messages, list) or not messages:
        raise RowError("field 'messages' must be a non-empty list of {role, content}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowError(f"messages[{i}] must be {{\"role\": str, \"content\": str}}, got {m!r:.80}")
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        return []
    messages = messages[: assistant[-1] + 1]  # trailing user turns have nothing to teach

    def render(msgs, generation_prompt=False) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as err:  # jinja templates raise their own errors (e.g. roles must alternate)
            raise RowError(f"the chat template rejected this conversation: {err}") from err

    # The text of assistant turn i is what rendering messages[:i+1] adds to rendering messages[:i] with the
    # generation prompt (the assistant header): the content and the end-of-turn marker, found by the template.
    full = render(messages).rstrip()
    pieces, pos = [], 0
    for i in assistant:
        prompt, through = render(messages[:i], generation_prompt=True), render(messages[: i + 1]).rstrip()
        start, end = len(prompt), len(through)
        if not (pos <= start <= end and through.startswith(prompt) and full.startswith(through)):
            raise RowError("the tokenizer's chat template does not render conversations prefix by prefix, so the "
                           "assistant turns cannot be located: use a template without history rewriting")
        pieces += [(full[pos:start], False), (full[start:end], True)]
        pos = end
    if pos < len(full):
        pieces.append((full[pos:], False))
    return [p for p in pieces if p[0]]


def trained_spans(segments: list[tuple[str, bool]]) -> tuple[str, list[tuple[int, int]], list[int]]:
    """(text, the character spans of trained pieces, where each response that follows a prompt starts)."""
    spans, starts, pos = [], [], 0
    for i, (piece, trained) in enumerate(segments):
        if trained:
            spans.append((pos, pos + len(piece)))
            if i > 0 and not segments[i - 1][1]:
                starts.append(pos)
        pos += len(piece)
    return "".join(t for t, _ in segments), spans, starts


def _encode(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Tokenize the joined text (the ids inference sees) and mark the tokens overlapping a response piece.

    One check first: the tokens before each response must be exactly the tokens of that prompt tokenized alone,
    which is what the model sees at generation time. Some tokenizers break that (GPT-2-style pre-tokenizers
    split "\\n\\n" before a letter but not at the end of the text); those rows are tokenized piece by piece
    instead, so the trained prompt ends the way a generation prompt ends. Slow tokenizers (no offsets) too."""
    text, spans, starts = trained_spans(segments)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        full, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        if all(_prompt_is_stable(tokenizer, text, start, full, offsets) for start in starts):
            return full, [any(s < e_ and e > s_ for s_, e_ in spans) for s, e in offsets]
    ids, flags = [], []
    for piece, trained in segments:
        piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        ids += piece_ids
        flags += [trained] * len(piece_ids)
    return ids, flags


def _prompt_is_stable(tokenizer, text: str, start: int, full: list[int], offsets) -> bool:
    alone = tokenizer(text[:start], add_special_tokens=False)["input_ids"]
    n = len(alone)
    return full[:n] == list(alone) and (n == len(full) or offsets[n][0] >= start)


def label_id(label, label_ids: dict | None) -> int:
    """A classification row's label -> its id (names through label_ids); RowError for a bad one."""
    if label is None:
        raise RowError(f"missing field 'label' (format classification needs {FORMAT_FIELDS[CLASSIFICATION][1]})")
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise RowError(f"field 'label' must be an integer id or a name, got {label!r}")
    if isinstance(label, int) and label < 0:
        raise RowError(f"field 'label' must be 0 or more, got {label}")
    if label_ids is not None and not isinstance(label, str):
        raise RowError(f"field 'label' is the id {label} but other rows use names: use names or ids throughout")
    return label_ids[label] if label_ids else label


def tokenize_row(row: dict, data_cfg: DataConfig, tokenizer, label_ids: dict | None = None) -> tuple[dict | None, bool]:
    """One row -> (example or None when nothing is left to train on, truncated?). Raises RowError."""
    fmt, max_len = data_cfg.format, data_cfg.max_seq_len
    if fmt == CLASSIFICATION:
        text, label = _field(row, "text", fmt), label_id(row.get("label"), label_ids)
        ids = tokenizer(text)["input_ids"]
        truncated = len(ids) > max_len
        return {"input_ids": ids[:max_len], "labels": label}, truncated

    segments = _segments(row, fmt, tokenizer)
    if not segments:
        return None, False
    if data_cfg.train_on_prompt:
        segments = [(t, True) for t, _ in segments]
    ids, flags = _encode(tokenizer, segments)
    text = segments[0][0]
    if tokenizer.bos_token is not None and not text.startswith(tokenizer.bos_token) and uses_bos(tokenizer):
        ids, flags = [tokenizer.bos_token_id] + ids, [False] + flags
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token, so examples cannot teach the model to stop: "
                        "set eos_token in the tokenizer files")
    if not ids or ids[-1] != eos:
        ids, flags = ids + [eos], flags + [True]
    flags[-1] = True  # the final EOS is always trained
    flags[0] = False  # nothing predicts the first token (and a packed row must not predict it from the previous)
    truncated = len(ids) > max_len
    ids, flags = ids[:max_len], flags[:max_len]
    if not any(flags):
        return None, truncated
    return {"input_ids": ids, "labels": [t if f else IGNORE_INDEX for t, f in zip(ids, flags)]}, truncated


def check_chat_template(data_cfg: DataConfig, tokenizer) -> None:
    if data_cfg.format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"data.format is chat but the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no "
                        f"chat template: use a tokenizer with a chat_template, or format alpaca / completion / text")


def tokenizing_detail(stats: DataStats) -> str:
    """'1000 rows at 5400 rows/s, cache written to PATH' (and the old entries it removed) or '1000 rows, cache
    reused from PATH'."""
    if stats.cache_reused:
        return f"{stats.rows} rows, cache reused from {stats.cache}"
    rate = stats.rows / max(stats.build_seconds, 1e-9)
    detail = f"{stats.rows} rows at {rate:.0f} rows/s, cache written to {stats.cache}"
    entries, freed = stats.cache_removed
    if entries:
        detail += f" (removed {entries} old {'entry' if entries == 1 else 'entries'} no run can use, " \
                  f"{human_bytes(freed)})"
    return detail


def build_datasets(data_cfg: DataConfig, tokenizer, seed: int = 0, num_labels: int | None = None,
                   progress: bool = False):
    """-> (train_examples, eval_examples, stats): sequences of dicts read by index from memory-mapped Arrow
    (data_arrow.Examples), in a fixed order (file order; the eval split is a seeded choice of rows), packed when
    data_cfg.packing, from the token cache when it holds them. Raises UserError on bad files or rows."""
    from qlora_trainer.data_arrow import prepare  # the batched Arrow form of this module's rules

    prepared = prepare(data_cfg, tokenizer, seed, num_labels, progress)
    return prepared.train, prepared.eval, prepared.stats


# ------------------------------------------------------------------------------------ packing, batches

def pack(examples: list[dict], max_seq_len: int) -> list[dict]:
    """Greedy, order-preserving packing into rows of at most max_seq_len tokens, with position_ids restarting at 0
    for every example (transformers then keeps attention inside each example, see the module docstring)."""
    rows, current = [], None
    for ex in examples:
        n = len(ex["input_ids"])
        if current is None or len(current["input_ids"]) + n > max_seq_len:
            current = {"input_ids": [], "labels": [], "position_ids": []}
            rows.append(current)
        current["input_ids"] += ex["input_ids"]
        current["labels"] += ex["labels"]
        current["position_ids"] += list(range(n))
    return rows


def collate(examples: list[dict], pad_id: int = 0) -> dict:
    """Pad to the longest in the batch on the right. Unpacked: input_ids, attention_mask, labels (B, T).
    Packed (examples carry position_ids): input_ids, position_ids, labels (B, T) and no attention_mask; pass the
    batch (minus labels) to the model as is, with use_cache=False. Classification: labels (B,)."""
    import torch

    packed = ["position_ids" in ex for ex in examples]
    if any(packed) and not all(packed):
        raise ValueError("collate: a batch mixes packed and unpacked examples")
    longest = max(len(ex["input_ids"]) for ex in examples)
    batch = {"input_ids": torch.full((len(examples), longest), pad_id, dtype=torch.long)}  # (B, T)
    if all(packed) and examples:
        # padding gets positions 0, 1, ...: a segment of its own after the real tokens
        batch["position_ids"] = torch.arange(longest).repeat(len(examples), 1)
    else:
        batch["attention_mask"] = torch.zeros((len(examples), longest), dtype=torch.long)
    token_labels = not isinstance(examples[0]["labels"], int)
    if token_labels:
        batch["labels"] = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    else:
        batch["labels"] = torch.tensor([ex["labels"] for ex in examples], dtype=torch.long)  # (B,)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(ex["input_ids"])
        if "position_ids" in batch:
            batch["position_ids"][i, :n] = torch.tensor(ex["position_ids"])
            batch["position_ids"][i, n:] = torch.arange(longest - n)
        else:
            batch["attention_mask"][i, :n] = 1
        if token_labels:
            batch["labels"][i, :n] = torch.tensor(ex["labels"])
    return batch


# ------------------------------------------------------------------------------------------- preview

def render_example(example: dict, tokenizer, open_mark: str = "[[", close_mark: str = "]]") -> str:
    """Decode an example with its trained tokens wrapped in [[...]] (special tokens shown)."""
    labels = example["labels"]
    if isinstance(labels, int):
        return f"{tokenizer.decode(example['input_ids'])}  -> label {labels}"
    out, run, run_trained = [], [], None
    for tid, lab in zip(example["input_ids"] + [None], labels + [None]):
        trained = lab is not None and lab != IGNORE_INDEX
        if tid is None or (run and trained != run_trained):
            text = tokenizer.decode(run, skip_special_tokens=False)
            out.append(f"{open_mark}{text}{close_mark}" if run_trained else text)
            run = []
        if tid is not None:
            run.append(tid)
            run_trained = trained
    return "".join(out)


def preview(data_cfg: DataConfig, tokenizer, seed: int = 0, n: int = 3, num_labels: int | None = None,
            progress: bool = False, timing_from: float | None = None) -> str:
    """A few rendered train examples with trained tokens in [[...]], then the token-length statistics. It builds
    (or reuses) the cache entry that `train` with the same settings reads. With `timing_from` (a perf_counter
    value) a last line says how long it took since then, and the cache entry written or reused."""
    import time

    from qlora_trainer.data_arrow import prepare

    prepared = prepare(data_cfg, tokenizer, seed, num_labels, progress)
    shown = ("each text is followed by its label id" if data_cfg.format == CLASSIFICATION
             else "trained tokens are shown in [[...]]")
    parts = [f"data: {data_cfg.path} (format {data_cfg.format}, max_seq_len {data_cfg.max_seq_len}); {shown}"]
    for i, ex in enumerate(prepared.unpacked_train[:n]):
        parts.append(f"--- example {i + 1} ({len(ex['input_ids'])} tokens) ---\n{render_example(ex, tokenizer)}")
    parts.append("--- statistics ---\n" + prepared.stats.summary())
    if timing_from is not None:
        parts.append(f"done in {time.perf_counter() - timing_from:.1f}s: {tokenizing_detail(prepared.stats)}")
    return "\n".join(parts)

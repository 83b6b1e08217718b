"""data.py's rules for a batch of rows, the function datasets.map runs: one fast-tokenizer call for the texts of a
batch, one for the prompts whose tokenization must be checked, the BOS rule decided once (not per row), and the
trained tokens found as ranges (two binary searches a response) rather than token by token. The result of a row is
what data.tokenize_row gives it (tests/test_data_arrow.py checks that in every format)."""

from __future__ import annotations

from qlora_trainer.config import DataConfig
from qlora_trainer.data import RowError, _field, _segments, label_id, trained_spans
from qlora_trainer.errors import UserError
from qlora_trainer.names import CLASSIFICATION, IGNORE_INDEX


def _row_error(where: str, index: int, err: RowError) -> UserError:
    return UserError(f"{where} row {index + 1}: {err}")


def _token_ranges(encoding, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token index ranges overlapping the character spans: the first token ending after the span's start to the
    first starting at or after its end. Offsets are in order, so two binary searches a span, reading single
    offsets from the Rust encoding (materializing all of them costs more than tokenizing)."""
    n = len(encoding.ids)
    offset = encoding.token_to_chars

    def first(test) -> int:  # the first token index for which test(offsets) holds (monotone), else n
        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi) // 2
            if test(offset(mid)):
                hi = mid
            else:
                lo = mid + 1
        return lo

    return [(first(lambda o, s=s: o[1] > s), first(lambda o, e=e: o[0] >= e)) for s, e in spans]


def _backend_encode(tokenizer, texts: list[str], offsets: bool = True) -> list:
    """The Rust encode_batch that tokenizer(texts, add_special_tokens=False) calls, without its conversion of every
    encoding into Python dicts (type ids, masks: half the time of a batch). The empty call first leaves the backend
    as such a call wants it (no truncation, no padding, special tokens as the tokenizer splits them)."""
    tokenizer("", add_special_tokens=False)
    backend = tokenizer._tokenizer
    if not offsets and hasattr(backend, "encode_batch_fast"):  # no offsets computed
        return backend.encode_batch_fast(texts, add_special_tokens=False)
    return backend.encode_batch(texts, add_special_tokens=False)


def _encode_batch(tokenizer, segments_list: list[list[tuple[str, bool]]]) -> list[tuple[list[int], list]]:
    """data._encode for a batch: (ids, trained token ranges) a row, the same tokens and masks."""
    out: list = [None] * len(segments_list)
    pieces = [trained_spans(s) for s in segments_list]
    if getattr(tokenizer, "is_fast", False) and segments_list:
        encodings = _backend_encode(tokenizer, [t for t, _, _ in pieces])
        full_ids = [e.ids for e in encodings]
        checks = [(r, start) for r, (_, _, starts) in enumerate(pieces) for start in starts]
        alone = _backend_encode(tokenizer, [pieces[r][0][:s] for r, s in checks], offsets=False) if checks else []
        unstable = set()
        for (r, start), prompt in zip(checks, alone):
            full, prompt = full_ids[r], prompt.ids
            n = len(prompt)
            if full[:n] != prompt or (n < len(full) and encodings[r].token_to_chars(n)[0] < start):
                unstable.add(r)
        for r, (_, spans, _) in enumerate(pieces):
            if r not in unstable:
                out[r] = (full_ids[r], _token_ranges(encodings[r], spans))
    todo = [r for r, o in enumerate(out) if o is None]  # piece by piece, as data._encode's fallback
    flat = [piece for r in todo for piece, _ in segments_list[r]]
    piece_ids = iter(tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])
    for r in todo:
        ids, ranges = [], []
        for _, trained in segments_list[r]:
            part = next(piece_ids)
            if trained:
                ranges.append((len(ids), len(ids) + len(part)))
            ids += part
        out[r] = (ids, ranges)
    return out


def _finish(ids: list[int], ranges: list, text: str, specials: tuple, max_len: int):
    """data.tokenize_row's BOS/EOS/first-token/truncation rules on (ids, ranges) -> (ids, labels or None, cut?).
    `specials`: (BOS text or None when no BOS is added, BOS id, EOS id)."""
    bos_text, bos, eos = specials
    if bos_text is not None and not text.startswith(bos_text):
        ids, ranges = [bos] + ids, [(a + 1, b + 1) for a, b in ranges]
    if not ids or ids[-1] != eos:
        ids = ids + [eos]
    ranges = ranges + [(len(ids) - 1, len(ids))]  # the final EOS is always trained
    truncated = len(ids) > max_len
    ids = ids[:max_len]
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in ranges:
        a, b = max(a, 1), min(b, len(ids))  # nothing predicts the first token
        if a < b:
            labels[a:b] = ids[a:b]
    if labels.count(IGNORE_INDEX) == len(labels):
        return ids, None, truncated
    return ids, labels, truncated


def _causal_batch(rows: list[dict], indices: list[int], cfg: DataConfig, tokenizer, add_bos: bool, where: str):
    segments_list = []
    for row, index in zip(rows, indices):
        try:
            segments = _segments(row, cfg.format, tokenizer)
        except RowError as err:
            raise _row_error(where, index, err) from err
        if cfg.train_on_prompt:
            segments = [(t, True) for t, _ in segments]
        segments_list.append(segments)
    live = [r for r, s in enumerate(segments_list) if s]
    encoded = _encode_batch(tokenizer, [segments_list[r] for r in live])
    result = [([], None, False)] * len(rows)  # no segments: nothing to train on
    specials = (tokenizer.bos_token if add_bos else None, tokenizer.bos_token_id, tokenizer.eos_token_id)
    for r, (ids, ranges) in zip(live, encoded):
        result[r] = _finish(ids, ranges, segments_list[r][0][0], specials, cfg.max_seq_len)
    return result


def _classification_batch(rows: list[dict], indices: list[int], cfg: DataConfig, tokenizer, label_ids, where: str):
    texts, labels = [], []
    for row, index in zip(rows, indices):
        try:
            texts.append(_field(row, "text", CLASSIFICATION))
            labels.append(label_id(row.get("label"), label_ids))
        except RowError as err:
            raise _row_error(where, index, err) from err
    encoded = tokenizer(texts)["input_ids"] if texts else []
    return [(ids[:cfg.max_seq_len], label, len(ids) > cfg.max_seq_len) for ids, label in zip(encoded, labels)]


def tokenize_batch(batch: dict, indices: list[int], *, cfg: DataConfig, tokenizer, add_bos: bool, label_ids,
                   where: str):
    """datasets.map's batched function: rows -> an Arrow table with one row per input row (input_ids, labels,
    trained, truncated, kept); a row with nothing to train on is kept=False with empty lists."""
    import pyarrow as pa

    names = list(batch)
    rows = [dict(zip(names, values)) for values in zip(*batch.values())]
    if cfg.format == CLASSIFICATION:
        result = _classification_batch(rows, indices, cfg, tokenizer, label_ids, where)
        labels = pa.array([label for _, label, _ in result], type=pa.int64())
        trained = [1] * len(result)
        kept = [True] * len(result)
    else:
        result = _causal_batch(rows, indices, cfg, tokenizer, add_bos, where)
        kept = [labels is not None for _, labels, _ in result]
        labels = pa.array([lab if lab is not None else [] for _, lab, _ in result], type=pa.list_(pa.int32()))
        trained = [0 if lab is None else len(lab) - lab.count(IGNORE_INDEX) for _, lab, _ in result]
    input_ids = pa.array([ids if k else [] for (ids, _, _), k in zip(result, kept)], type=pa.list_(pa.int32()))
    return pa.table({"input_ids": input_ids, "labels": labels, "trained": pa.array(trained, type=pa.int32()),
                     "truncated": pa.array([t for _, _, t in result], type=pa.bool_()),
                     "kept": pa.array(kept, type=pa.bool_())})

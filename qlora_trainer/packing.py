"""Greedy, order-preserving packing of tokenized examples held in Arrow, in batched numpy form.

The packed rows are those of data.pack (the list reference): examples are placed in order, a new row starts when
the next example does not fit in max_seq_len, and position_ids restart at 0 for every example. Only the row
boundaries need a loop (one step per example, over their lengths); the tokens move as Arrow buffers: a packed row
of consecutive examples is the same flat values with fewer list offsets."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

CHUNK_EXAMPLES = 16384  # examples gathered per write: one chunk's arrays are packing's memory, whatever the row count


def row_starts(lengths: np.ndarray, max_seq_len: int) -> np.ndarray:
    """The example index that starts each packed row (data.pack's greedy rule)."""
    starts, used = [], max_seq_len + 1  # the first example always starts a row
    for i, n in enumerate(lengths.tolist()):
        if used + n > max_seq_len:
            starts.append(i)
            used = 0
        used += n
    return np.asarray(starts, dtype=np.int64)


def write_packed(table, order: np.ndarray, lengths: np.ndarray, max_seq_len: int, path: str,
                 release: Callable[[], object] = lambda: None) -> int:
    """Pack the rows `order` of an Arrow table (columns input_ids, labels) in that order into an Arrow file at
    `path` (columns input_ids, labels, position_ids), `lengths` being their token counts; returns the row count.
    `release` is called after each record batch of `table` is read from (data_arrow drops the mapped pages read)."""
    import pyarrow as pa
    from datasets import Features, Sequence, Value
    from datasets.arrow_writer import ArrowWriter

    starts = row_starts(lengths, max_seq_len)
    bounds = np.append(starts, len(order))
    features = Features({name: Sequence(Value("int32")) for name in ("input_ids", "labels", "position_ids")})
    with ArrowWriter(path=path, features=features) as writer:
        first = 0  # first packed row of this chunk
        while first < len(starts):
            last = int(np.searchsorted(starts, starts[first] + CHUNK_EXAMPLES, side="left"))
            last = max(last, first + 1)
            e0, e1 = int(bounds[first]), int(bounds[last])
            part = _take(table, order[e0:e1], release)
            lens = lengths[e0:e1]
            ends = np.cumsum(lens)
            row_offsets = np.concatenate([[0], ends[bounds[first + 1:last + 1] - e0 - 1]]).astype(np.int32)
            positions = np.arange(int(ends[-1]), dtype=np.int32) - np.repeat(ends - lens, lens).astype(np.int32)
            offsets = pa.array(row_offsets, type=pa.int32())
            columns = {name: pa.ListArray.from_arrays(offsets, _values(part.column(name)))
                       for name in ("input_ids", "labels")}
            columns["position_ids"] = pa.ListArray.from_arrays(offsets, pa.array(positions, type=pa.int32()))
            writer.write_table(pa.table(columns))
            first = last
        writer.finalize()
    return len(starts)


def _take(table, rows: np.ndarray, release: Callable[[], object]):
    """table.take(rows), one record batch at a time (a run of rows in the same batch is one take). Table.take on a
    list column first concatenates all of the column's chunks: a copy of every token in the table, for each call."""
    import pyarrow as pa

    batches = table.to_batches()
    starts = np.cumsum([0] + [b.num_rows for b in batches])
    which = np.searchsorted(starts, rows, side="right") - 1
    cuts = [0, *(np.flatnonzero(np.diff(which)) + 1).tolist(), len(rows)]
    parts = []
    for a, b in zip(cuts, cuts[1:]):
        parts.append(batches[which[a]].take(pa.array(rows[a:b] - starts[which[a]])))
        release()
    return pa.Table.from_batches(parts, schema=table.schema)


def _values(column):
    """The flat int32 values of a list column, in row order."""
    import pyarrow as pa

    return pa.concat_arrays([chunk.flatten() for chunk in column.chunks]).cast(pa.int32())

"""data.streaming: examples read, rendered and tokenized while training, in file order, with no pass over the data
first (datasets' IterableDataset). What it gives up, and how resume stays exact:

- no seeded shuffle, no train.epochs (the row count is unknown), no eval split (eval rows come from data.eval_path),
  no statistics before training, no classification (its label names need every row);
- the position in the stream is (epoch, row): the source row where the next unused example starts. A checkpoint
  stores it, and a resumed run skips exactly that many rows (without tokenizing them) and goes on from there, so
  it sees the same examples, and packs them into the same rows, as a run that never stopped.
"""

from __future__ import annotations

from collections.abc import Iterator

from qlora_trainer.config import DataConfig
from qlora_trainer.data import check_chat_template, uses_bos
from qlora_trainer.data_arrow import TOKENIZE_BATCH
from qlora_trainer.data_batches import tokenize_batch
from qlora_trainer.data_sources import stream_rows
from qlora_trainer.errors import UserError
from qlora_trainer.names import CLASSIFICATION


class StreamingExamples:
    """The train examples of a streamed dataset, taken in order by `next_examples(n)`; `position` is what a
    checkpoint stores and `seek(position)` what a resumed run calls."""

    def __init__(self, cfg: DataConfig, tokenizer):
        if cfg.format == CLASSIFICATION:
            raise UserError("data.streaming does not support format classification (its label names need every "
                            "row first): set data.streaming=false")
        check_chat_template(cfg, tokenizer)
        self.cfg, self.tokenizer = cfg, tokenizer
        self.add_bos = tokenizer.bos_token is not None and uses_bos(tokenizer)
        self.epoch, self.row = 0, 0
        self._stream: Iterator | None = None

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "row": self.row}

    def seek(self, position: dict) -> None:
        self.epoch, self.row = int(position["epoch"]), int(position["row"])
        self._stream = None

    def next_examples(self, n: int) -> list[dict]:
        """The next n examples (packed rows with data.packing), wrapping to a new epoch at the end of the data."""
        taken = []
        while len(taken) < n:
            if self._stream is None:
                self._stream = self._examples(self.epoch, self.row)
            item = next(self._stream, None)
            if item is None:
                if self.row == 0:
                    raise UserError(f"{self.cfg.path}: no training examples in the stream (every row was dropped: "
                                    f"check data.format and data.max_seq_len)")
                self.epoch, self.row, self._stream = self.epoch + 1, 0, None
                continue
            example, self.row = item
            taken.append(example)
        return taken

    def _examples(self, epoch: int, start_row: int) -> Iterator[tuple[dict, int]]:
        """(example, the row after its last row) from row `start_row` on."""
        rows = stream_rows(self.cfg.path)
        if start_row:
            rows = rows.skip(start_row)
        examples = self._tokenized(rows, start_row)
        return _packed(examples, self.cfg.max_seq_len) if self.cfg.packing else examples

    def _tokenized(self, rows, start_row: int) -> Iterator[tuple[dict, int]]:
        index = start_row
        for batch in rows.iter(batch_size=TOKENIZE_BATCH):
            size = len(next(iter(batch.values())))
            table = tokenize_batch(batch, list(range(index, index + size)), cfg=self.cfg, tokenizer=self.tokenizer,
                                   add_bos=self.add_bos, label_ids=None, where=self.cfg.path)
            for offset, row in enumerate(table.to_pylist()):
                if row["kept"]:
                    yield {"input_ids": row["input_ids"], "labels": row["labels"]}, index + offset + 1
            index += size


def _packed(examples: Iterator[tuple[dict, int]], max_seq_len: int) -> Iterator[tuple[dict, int]]:
    """data.pack's greedy rule on a stream: a packed row is complete when the next example does not fit."""
    current, end = None, 0
    for example, after in examples:
        n = len(example["input_ids"])
        if current is not None and len(current["input_ids"]) + n > max_seq_len:
            yield current, end
            current = None
        if current is None:
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += example["input_ids"]
        current["labels"] += example["labels"]
        current["position_ids"] += list(range(n))
        end = after
    if current is not None:
        yield current, end


def streaming_datasets(cfg: DataConfig, tokenizer, progress: bool, log) -> tuple[StreamingExamples, object, object]:
    """(train stream, eval examples, stats) for data.streaming: eval examples come from data.eval_path (tokenized
    through the cache as usual), else there are none; stats count the eval set only."""
    import dataclasses

    from qlora_trainer.data import DataStats
    from qlora_trainer.data_arrow import prepare

    train = StreamingExamples(cfg, tokenizer)
    log(f"streaming {cfg.path}: rows are read and tokenized as training goes (file order, no statistics up front)")
    if not cfg.eval_path:
        if cfg.eval_fraction:
            log("data.streaming: data.eval_fraction is not used (no split of a stream): set data.eval_path to "
                "evaluate")
        return train, [], DataStats()
    eval_cfg = dataclasses.replace(cfg, path=cfg.eval_path, eval_path=None, eval_fraction=0.0, streaming=False)
    prepared = prepare(eval_cfg, tokenizer, progress=progress)
    return train, prepared.train, prepared.stats

"""How every command shows progress: tqdm bars on a terminal, never in a log.

    QLORA_PROGRESS=1    bars, always
    QLORA_PROGRESS=0    no bars, even on a terminal
    unset               bars when stderr and stdout are both terminals; none otherwise (nohup, `| tee`, `> log`,
                        CI, a scheduler), where a bar writes carriage returns that no log can show

Without bars `train` writes plain lines into its log (stdout) instead: a line when a phase starts and when it ends
("loading the model ... done in 3.1s") and one every train.log_every steps (training_line). The other commands
(data, merge, summary, inspect --base, classify, generate) draw a bar by this rule and print nothing in its place:
their stdout is their result, and their stderr holds nothing but an error's one line.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator

ENV = "QLORA_PROGRESS"
_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def bars() -> bool:
    """True: draw tqdm bars (on stderr); False: none (`train` writes plain lines into its log instead)."""
    setting = os.environ.get(ENV, "").strip().lower()
    if setting in _ON:
        return True
    if setting in _OFF:
        return False
    return _is_terminal(sys.stderr) and _is_terminal(sys.stdout)


def say(text: str) -> None:
    """Print a line and flush it: under nohup or a scheduler stdout is block-buffered, and a progress line that
    waits in a buffer for minutes is no progress line."""
    print(text, flush=True)


def _is_terminal(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


@contextlib.contextmanager
def phase(what: str, log: Callable[[str], None]) -> Iterator[dict]:
    """`what ...` when the phase starts and `what: done in X.Xs` when it ends (not when it fails). The yielded dict
    takes a "detail" that the end line shows before the time ("1000 rows, done in 1.2s")."""
    log(f"{what} ...")
    start, extra = time.perf_counter(), {}
    yield extra
    detail = f"{extra['detail']}, " if extra.get("detail") else ""
    log(f"{what}: {detail}done in {time.perf_counter() - start:.1f}s")


def duration(seconds: float) -> str:
    """3725 -> '1h02m', 125 -> '2m05s', 7.2 -> '7s'."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def training_line(done: int, total: int, fields: dict[str, str], eta_seconds: float | None) -> str:
    """'step 20/500 (4%): loss 1.2345, lr 2.00e-04, tok/s 1234, eval_loss 1.1000, ETA 5m12s'."""
    parts = [f"{name} {value}" for name, value in fields.items()]
    if eta_seconds is not None:
        parts.append(f"ETA {duration(eta_seconds)}")
    return f"step {done}/{total} ({100 * done / max(total, 1):.0f}%): " + ", ".join(parts)

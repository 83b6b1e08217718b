"""Write the demo chat dataset: reverse a short space-separated letter string.

    python scripts/make_demo_data.py          # data/demo/train.jsonl (1500 rows), data/demo/eval.jsonl (100)

Row: {"messages": [{"role": "user", "content": "reverse: c a t"}, {"role": "assistant", "content": "t a c"}]}

Why this task: the tiny base knows the letters and the chat format (it was pretrained on "spell" and
"repeat" chats) but never saw reversal, so it starts near 0% exact match; a LoRA learns it in minutes.
Letters are space-separated so each is one token (the BPE would merge a bare word into pieces).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def random_strings(n: int, rng: random.Random, min_len: int = 3, max_len: int = 5) -> list[str]:
    """n distinct non-palindromes (a palindrome's reverse is itself: a copying base would get it right)."""
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len)))
        if s != s[::-1] and s not in seen:
            seen.add(s)
            out.append(s)
    return out


def to_row(s: str) -> dict:
    return {"messages": [
        {"role": "user", "content": "reverse: " + " ".join(s)},
        {"role": "assistant", "content": " ".join(reversed(s))},
    ]}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description="Write data/demo/{train,eval}.jsonl")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "data" / "demo"))
    parser.add_argument("--train", type=int, default=1500)
    parser.add_argument("--eval", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    strings = random_strings(args.train + args.eval, random.Random(args.seed))  # distinct: eval is held out
    out = Path(args.out)
    write_jsonl(out / "train.jsonl", [to_row(s) for s in strings[: args.train]])
    write_jsonl(out / "eval.jsonl", [to_row(s) for s in strings[args.train :]])
    print(f"wrote {out}/train.jsonl ({args.train} rows) and eval.jsonl ({args.eval} rows)")


if __name__ == "__main__":
    main()

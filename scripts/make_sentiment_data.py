"""Write the bundled demo sets of the classifier and the rank sweep, deterministically.

    python scripts/make_sentiment_data.py     # data/sentiment/{train,eval}.jsonl, data/reverse/{train,eval}.jsonl

data/sentiment: SST-2-style short reviews in three classes (names, so they map to ids in sorted order:
negative=0, neutral=1, positive=2). Built from the tiny models' pretraining vocabulary; a fifth of the opinionated
rows are negated ("is not good" is negative), so a bag of words is not enough.
    {"text": "i think the red car is not good.", "label": "negative"}

data/reverse: the demo's letter reversal as a `completion` set, which needs no chat template (the tiny GPT-2 has
none), for causal sweeps on either tiny model.
    {"prompt": "reverse: c a t =", "completion": " t a c"}
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NOUNS = "cat dog bird horse book song game cake city garden river house car road friend teacher robot".split()
ADJS = "big small red blue old new tall quiet".split()
POSITIVE = "good great nice happy kind lovely bright fun".split()
NEGATIVE = "bad awful sad boring dark cold ugly slow".split()
OPINION = ["the {adj} {noun} is {not}{word}.", "i think the {noun} is {not}{word}.",
           "this {noun} was {not}very {word}.", "my friend said the {adj} {noun} is {not}{word}.",
           "a {not}{word} {noun}, and a {adj} one."]
NEUTRAL = ["the {noun} is in the {place}.", "a {adj} {noun} sees the {noun2}.", "the {noun} has a {adj} {noun2}.",
           "i saw the {noun} near the {place}.", "the {adj} {noun} and the {noun2}."]
PLACES = "park school market kitchen forest village beach library station".split()


def sentiment_row(rng: random.Random) -> dict:
    kind = rng.choice(["positive", "negative", "neutral"])
    noun, noun2 = rng.sample(NOUNS, 2)
    fill = dict(noun=noun, noun2=noun2, adj=rng.choice(ADJS), place=rng.choice(PLACES))
    if kind == "neutral":
        return {"text": rng.choice(NEUTRAL).format(**fill), "label": "neutral"}
    negated = rng.random() < 0.2
    word = rng.choice(POSITIVE if kind == "positive" else NEGATIVE)
    template = rng.choice(OPINION[:4] if negated else OPINION)
    text = template.format(**fill, word=word, **{"not": "not " if negated else ""})
    label = kind if not negated else ("negative" if kind == "positive" else "positive")
    return {"text": text, "label": label}


def reverse_row(rng: random.Random) -> dict:
    letters = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 5)))
    return {"prompt": f"reverse: {' '.join(letters)} =", "completion": " " + " ".join(reversed(letters))}


def distinct(make, n: int, rng: random.Random, key: str) -> list[dict]:
    rows, seen = [], set()
    while len(rows) < n:
        row = make(rng)
        if row[key] not in seen:
            seen.add(row[key])
            rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description="Write data/sentiment and data/reverse")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "data"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    rows = distinct(sentiment_row, 1000, random.Random(args.seed), "text")  # distinct texts: eval is held out
    write_jsonl(out / "sentiment" / "train.jsonl", rows[:800])
    write_jsonl(out / "sentiment" / "eval.jsonl", rows[800:])
    rows = distinct(reverse_row, 700, random.Random(args.seed + 1), "prompt")
    write_jsonl(out / "reverse" / "train.jsonl", rows[:600])
    write_jsonl(out / "reverse" / "eval.jsonl", rows[600:])
    print(f"wrote {out}/sentiment (800 + 200 rows) and {out}/reverse (600 + 100 rows)")


if __name__ == "__main__":
    main()

"""Prove the demo task is learnable by a LoRA on the tiny base, with plain transformers + PEFT (not our
trainer), on CPU in fp32: greedy exact-match accuracy on data/demo/eval.jsonl before and after.

    python scripts/check_demo_learnable.py            # 1-5 minutes on 2 cores (500 steps), depending on load

Our trainer later runs the same recipe on an NF4 base; this is the reference it should roughly match.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def encode(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the whole chat, and labels that are -100 everywhere but the assistant's reply (+ its </s>)."""
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(messages, tokenize=False)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = tok(full, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids, "the prompt must tokenize as a prefix of the full chat"
    return ids, [-100] * len(prompt_ids) + ids[len(prompt_ids) :]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad with eos; the attention mask and -100 labels keep the padding out of the loss."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, : len(x)], labels[row, : len(y)], mask[row, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@torch.no_grad()
def exact_match(model, tok, rows: list[dict]) -> float:
    """Greedy-decode each prompt, one at a time (no padding to get wrong), compare to the reference."""
    model.eval()
    hits = 0
    for row in rows:
        prompt = tok.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                             do_sample=False, pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        hits += answer == row["messages"][-1]["content"]
    model.train()
    return hits / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "assets" / "tiny-llama"))
    parser.add_argument("--data", default=str(ROOT / "data" / "demo"))
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)  # stored bf16; CPU runs fp32
    train_rows, eval_rows = read_jsonl(Path(args.data) / "train.jsonl"), read_jsonl(Path(args.data) / "eval.jsonl")
    train = [encode(tok, row["messages"]) for row in train_rows]

    before = exact_match(model, tok, eval_rows)
    print(f"exact match before: {before:.0%} on {len(eval_rows)} eval rows", flush=True)

    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        # Warmup then cosine to zero: the usual LoRA schedule.
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (args.steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = args.lr * scale
        loss = model(**collate(rng.sample(train, args.batch_size), tok.eos_token_id)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.4f}  ({time.time() - t0:.0f}s)", flush=True)
    train_s = time.time() - t0

    after = exact_match(model, tok, eval_rows)
    print(f"exact match after: {after:.0%} on {len(eval_rows)} eval rows "
          f"({args.steps} steps x {args.batch_size}, lr {args.lr}, train {train_s:.0f}s)")


if __name__ == "__main__":
    main()

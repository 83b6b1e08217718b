"""The demo: fine-tune the bundled tiny LLaMA on the bundled task and show that it learned.

    python scripts/demo.py [key=value ...]          # overrides for configs/tiny.yaml, e.g. train.max_steps=100

Prints exact-match accuracy (greedy answers to held-out prompts) and eval loss, before and after training,
and leaves the adapter, metrics.jsonl and loss.png in the run folder (runs/tiny). Each demo is a new run: an earlier
demo run in that folder is removed first (it says so); resume=true continues it instead.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere, installed or not

from qlora_trainer import lock, tasks  # noqa: E402
from qlora_trainer.adapter import load_adapter_into  # noqa: E402
from qlora_trainer.config import load_config  # noqa: E402
from qlora_trainer.data import build_datasets, load_tokenizer, pad_token_id  # noqa: E402
from qlora_trainer.errors import UserError  # noqa: E402
from qlora_trainer.loading import load_quantized  # noqa: E402
from qlora_trainer.names import ADAPTER_DIR, CHECKPOINTS_DIR, RUN_CONFIG_FILE  # noqa: E402
from qlora_trainer.train import train  # noqa: E402


@torch.no_grad()
def exact_match(model, tokenizer, rows: list[dict], max_new_tokens: int = 24, batch_size: int = 50) -> float:
    """Share of chat rows whose greedy answer equals the reference assistant message exactly."""
    model.eval()
    pad = pad_token_id(tokenizer)
    hits = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [tokenizer.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, tokenize=True,
                                                 return_dict=False) for r in chunk]
        longest = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])  # left padding for generation
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for row, generated in zip(chunk, out[:, longest:]):
            answer = tokenizer.decode(generated, skip_special_tokens=True).strip()
            hits += answer == row["messages"][-1]["content"].strip()
    return hits / len(rows)


def measure(model, tokenizer, cfg, eval_rows, eval_examples) -> tuple[float, float]:
    task = tasks.get(cfg.model.task)
    loss = task.evaluate(task.loss_module(model, cfg.train.loss_chunk_size), eval_examples, 16,
                         pad_token_id(tokenizer), "cpu")["eval_loss"]
    return exact_match(model, tokenizer, eval_rows), loss


def start_fresh(cfg, log=print) -> None:
    """Make cfg.out ready for a new run: an earlier demo run there (same model and data) is removed, after saying
    so; anything else is refused. With resume=true the folder is left for train to continue."""
    out = Path(cfg.out)
    checkpoints = sorted(p.name for p in (out / CHECKPOINTS_DIR).glob("step-*")) if out.is_dir() else []
    if cfg.resume or not (checkpoints or (out / ADAPTER_DIR).exists()):
        return
    if not _is_demo_run(out, cfg):
        raise UserError(f"out={out} holds a run that is not this demo's (or its {RUN_CONFIG_FILE} is missing): the "
                        f"demo starts a new run each time and will not remove it: choose another out=")
    lock.check_free(out)  # a demo still running there: refuse rather than delete under it
    newest = f" (newest checkpoint {checkpoints[-1]})" if checkpoints else ""
    log(f"{out} holds an earlier demo run{newest}: removing it to start a new one (pass resume=true to continue "
        f"it instead)")
    shutil.rmtree(out)


def _is_demo_run(out: Path, cfg) -> bool:
    try:
        earlier = load_config(str(out / RUN_CONFIG_FILE))
    except UserError:
        return False
    return (earlier.model.path, earlier.data.path) == (cfg.model.path, cfg.data.path)


def _what_was_trained(result, minutes: float) -> str:
    if result.already_complete:
        return f"the run was already complete at step {result.steps}: nothing trained"
    if result.resumed_from:
        return f"trained steps {result.resumed_from + 1} to {result.steps} in {minutes:.1f} min"
    return f"trained {result.steps} steps in {minutes:.1f} min"


def demo_config(overrides: list[str]):
    """configs/tiny.yaml with the overrides (its paths resolve against configs/, so the demo runs from anywhere)."""
    return load_config(str(REPO / "configs" / "tiny.yaml"), overrides)


def main(overrides: list[str]) -> int:
    cfg = demo_config(overrides)
    start_fresh(cfg)
    tokenizer = load_tokenizer(cfg.model.path)
    eval_rows = [json.loads(line) for line in Path(cfg.data.eval_path).read_text().splitlines() if line.strip()]
    _, eval_examples, _ = build_datasets(cfg.data, tokenizer, cfg.train.seed)

    base = load_quantized(cfg.model.path, compute_dtype=cfg.model.compute_dtype, device="cpu", progress=False)
    before = measure(base, tokenizer, cfg, eval_rows, eval_examples)
    print(f"before training: exact match {before[0]:.1%}, eval loss {before[1]:.3f}", flush=True)

    started = time.perf_counter()
    result = train(cfg)  # bars on a terminal, plain progress lines in a log (qlora_trainer.progress)
    minutes = (time.perf_counter() - started) / 60

    tuned = load_quantized(cfg.model.path, compute_dtype=cfg.model.compute_dtype, device="cpu", progress=False)
    load_adapter_into(tuned, result.adapter)
    after = measure(tuned, tokenizer, cfg, eval_rows, eval_examples)
    task = eval_rows[0]["messages"][0]["content"]
    print(f"\ntask: {len(eval_rows)} held-out prompts like {task!r}\n"
          f"{'':14}{'exact match':>12}{'eval loss':>11}\n"
          f"{'base model':14}{before[0]:>12.1%}{before[1]:>11.3f}\n"
          f"{'+ adapter':14}{after[0]:>12.1%}{after[1]:>11.3f}\n"
          f"{_what_was_trained(result, minutes)}; adapter in {result.adapter}, "
          f"metrics in {result.metrics}, plot in {result.plot}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main(sys.argv[1:]))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)

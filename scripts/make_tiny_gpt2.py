"""Build the tiny GPT-2 that tests and demos run on: transformers' GPT2LMHeadModel (Conv1D projections stored
(in, out), fused q/k/v in `c_attn`, tied lm_head), a byte-level BPE tokenizer with GPT-2's conventions (one
special token <|endoftext|> that is BOS, EOS and UNK; nothing added to plain text; no pad token; no chat
template), briefly pretrained on the same synthetic corpus as the tiny LLaMA, saved in bf16 as sharded
safetensors.

    python scripts/make_tiny_gpt2.py                  # writes assets/tiny-gpt2/ (a minute or two on 2 idle cores; 17 minutes on a busy one)

Tests build untrained variants in a second:

    sys.path.insert(0, "scripts"); from make_tiny_gpt2 import make_tiny_gpt2
    make_tiny_gpt2(tmp_path / "g", dtype=torch.float32)

Importing this module does no work; everything runs from functions.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_model import pretrain, synthetic_corpus  # noqa: E402

EOT = "<|endoftext|>"
VOCAB_SIZE = 1024
# Every Conv1D's in-dimension (128, and 512 for the MLP's c_proj) is a multiple of 64, as bitsandbytes' CPU NF4
# path needs. n_inner None means 4 * n_embd, as in every GPT-2.
MODEL_SHAPE = dict(n_embd=128, n_layer=4, n_head=4, n_positions=256)


def build_tokenizer(docs: list, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [m["content"] for d in docs if isinstance(d, list) for m in d] + [d for d in docs if isinstance(d, str)]
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                                   model_max_length=MODEL_SHAPE["n_positions"], clean_up_tokenization_spaces=False)


def encode_doc(tokenizer: PreTrainedTokenizerFast, doc: str | list[dict]) -> list[int]:
    """GPT-2 style: documents separated by <|endoftext|>; a chat is plain "user: ...\\nassistant: ..." text."""
    if isinstance(doc, list):
        doc = "\n".join(f"{m['role']}: {m['content']}" for m in doc)
    return tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]


def make_tiny_gpt2(out_dir: str | Path, *, dtype: torch.dtype = torch.bfloat16, pretrain_steps: int = 0,
                   seed: int = 0, n_docs: int = 20000, max_shard_size: str = "800KB", **shape) -> Path:
    """Write a tokenizer + GPT2LMHeadModel folder (random weights unless pretrain_steps > 0) and return it."""
    torch.manual_seed(seed)
    random.seed(seed)
    out = Path(out_dir)
    docs = synthetic_corpus(n_docs, seed=seed)
    tokenizer = build_tokenizer(docs)
    eot = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), **{**MODEL_SHAPE, **shape}, bos_token_id=eot, eos_token_id=eot,
                        dtype="float32")
    model = GPT2LMHeadModel(config)
    model.generation_config = GenerationConfig(bos_token_id=eot, eos_token_id=eot)
    if pretrain_steps > 0:
        stream = [i for doc in docs for i in encode_doc(tokenizer, doc)]
        print(f"corpus: {len(docs)} docs, {len(stream)} tokens; vocab {len(tokenizer)}", flush=True)
        first, last = pretrain(model, stream, steps=pretrain_steps, seq_len=64, batch_size=16, seed=seed)
        print(f"pretraining loss: start {first:.4f} -> end {last:.4f}", flush=True)
    model.to(dtype)
    model.config.dtype = dtype
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    return out


def check_folder(path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.pytorch_utils import Conv1D

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert tok("the cat")["input_ids"][0] != tok.eos_token_id, "GPT-2 adds no BOS"
    assert tok.pad_token is None and not getattr(tok, "chat_template", None)
    convs = [m for m in model.modules() if isinstance(m, Conv1D)]
    assert convs and all(m.weight.shape[0] % 64 == 0 for m in convs)
    assert model.lm_head.weight is model.transformer.wte.weight, "lm_head is tied to the embeddings"
    print(f"reload ok: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} params, "
          f"dtype {model.dtype}, vocab {len(tok)}, {len(convs)} Conv1D layers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "assets" / "tiny-gpt2"))
    parser.add_argument("--steps", type=int, default=200, help="pretraining steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    out = make_tiny_gpt2(args.out, pretrain_steps=args.steps, seed=args.seed)
    files = sorted(p for p in out.iterdir())
    print(f"wrote {out} in {time.time() - t0:.0f}s: " + ", ".join(f"{p.name} ({p.stat().st_size // 1024} KB)" for p in files))
    check_folder(out)


if __name__ == "__main__":
    main()

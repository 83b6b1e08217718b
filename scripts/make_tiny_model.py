"""Build the tiny LLaMA that tests and demos run on: a byte-level BPE tokenizer with a Llama-3-style
chat template, and a 4-layer LlamaForCausalLM briefly pretrained on a synthetic corpus, saved in bf16
as sharded safetensors (like a real checkpoint).

    python scripts/make_tiny_model.py                 # writes assets/tiny-llama/ (about 2-3 minutes on 2 cores)

Tests build variants (tied embeddings, one file, fp32) without pretraining:

    sys.path.insert(0, "scripts"); from make_tiny_model import make_tiny_llama
    make_tiny_llama(tmp_path / "m", tied=True, single_file=True, dtype=torch.float32)

Importing this module does no work; everything runs from functions.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
SPECIAL_TOKENS = [UNK, BOS, EOS, HEADER_START, HEADER_END]  # ids 0..4, in this order
VOCAB_SIZE = 1024

# Llama-3 layout: <s><|start_header_id|>role<|end_header_id|>\n\ncontent</s>...; the end marker is the
# eos token, so a model trained on assistant turns learns to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Every linear's in_features (128 and 384) is a multiple of 64, which bitsandbytes' CPU NF4 path needs.
MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)

# ---------------------------------------------------------------- synthetic corpus

NOUNS = ("cat dog bird fish horse cow sheep tree house car boat book table chair door window river "
         "mountain city road garden apple bread milk water cake ball game song friend teacher child "
         "mother father sister brother king queen farmer doctor robot star moon sun cloud rain snow "
         "box cup key lamp phone shoe hat coat bed").split()
ADJS = ("big small red blue green happy sad old new fast slow warm cold bright dark quiet loud "
        "tall short kind busy lazy clever").split()
VERBS = ("sees likes finds helps takes makes wants reads eats moves opens closes paints carries "
         "follows watches").split()
PLACES = "park school market kitchen forest village beach library station garden".split()
COLORS = "red blue green yellow white black orange purple brown pink".split()
GREETINGS = [
    ("hello", "hi! how can i help you today?"),
    ("hi there", "hello! what can i do for you?"),
    ("good morning", "good morning! i hope your day goes well."),
    ("how are you?", "i am fine, thank you. how are you?"),
    ("thank you", "you are welcome."),
    ("what is your name?", "i am a tiny assistant."),
    ("tell me a joke", "why did the cat sit on the computer? to keep an eye on the mouse."),
    ("goodbye", "goodbye! have a nice day."),
]


def _sentence(rng: random.Random) -> str:
    kind = rng.randrange(6)
    a, b = rng.sample(NOUNS, 2)
    if kind == 0:
        return f"the {rng.choice(ADJS)} {a} {rng.choice(VERBS)} the {b}."
    if kind == 1:
        return f"a {a} is in the {rng.choice(PLACES)} with a {rng.choice(ADJS)} {b}."
    if kind == 2:
        start = rng.randrange(0, 90)
        return "count: " + " ".join(str(i) for i in range(start, start + rng.randrange(3, 9))) + "."
    if kind == 3:
        x, y = rng.randrange(10), rng.randrange(10)
        return f"{x} plus {y} is {x + y}."
    if kind == 4:
        word = rng.choice(NOUNS)
        return f"the word {word} is spelled {' '.join(word)}."
    return f"the {a} is {rng.choice(COLORS)} and the {b} is {rng.choice(COLORS)}."


def _chat(rng: random.Random) -> list[dict]:
    """Small talk plus forward spelling; never letter reversal (that is the demo task the base must not know)."""
    kind = rng.randrange(4)
    if kind == 0:
        user, reply = rng.choice(GREETINGS)
    elif kind == 1:
        word = rng.choice(NOUNS)
        user, reply = f"spell {word}", " ".join(word)
    elif kind == 2:
        letters = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randrange(3, 6)))
        user, reply = f"repeat: {' '.join(letters)}", " ".join(letters)
    else:
        noun = rng.choice(NOUNS)
        user, reply = f"tell me about the {noun}", _sentence(rng)
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def synthetic_corpus(n_docs: int, seed: int = 0) -> list[str | list[dict]]:
    """Documents: plain strings (a few sentences) or chat message lists, about one in three chats."""
    rng = random.Random(seed)
    docs: list[str | list[dict]] = []
    for _ in range(n_docs):
        if rng.random() < 0.35:
            docs.append(_chat(rng))
        else:
            docs.append(" ".join(_sentence(rng) for _ in range(rng.randrange(1, 5))))
    return docs


# ---------------------------------------------------------------- tokenizer

def build_tokenizer(docs: list, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Byte-level BPE (like Llama-3) trained on the corpus text; <s> is prepended when add_special_tokens."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes, so unk never fires
        show_progress=False,
    )
    # Train on plain content only: the template's markup is special tokens and must not eat merges.
    # No newlines either: a "\n\n" merge would make the generation prompt (ending in "\n\n") tokenize
    # differently from the same text followed by the reply, breaking prompt masking by prefix.
    texts = [m["content"] for d in docs if isinstance(d, list) for m in d]
    texts += [d for d in docs if isinstance(d, str)] + ["user", "assistant", "system"]
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    # No pad token on purpose: like Llama-3, users' tokenizers often have none; our data code pads
    # with eos and masks by attention mask.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[HEADER_START, HEADER_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def encode_doc(tokenizer: PreTrainedTokenizerFast, doc: str | list[dict]) -> list[int]:
    """<s> text </s> for plain text; the chat template (which adds <s> and the </s> ends) for chats."""
    if isinstance(doc, list):
        text = tokenizer.apply_chat_template(doc, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]


# ---------------------------------------------------------------- model

def build_model(tokenizer: PreTrainedTokenizerFast, *, tied: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **MODEL_SHAPE,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    return model


def pretrain(model: LlamaForCausalLM, token_stream: list[int], *, steps: int, seq_len: int = 128,
             batch_size: int = 32, lr: float = 3e-3, seed: int = 0) -> tuple[float, float]:
    """Next-token prediction on random windows of the packed corpus; returns (first, last) loss."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.tensor(token_stream, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    model.train()
    first = last = float("nan")
    t0 = time.time()
    for step in range(steps):
        # Linear warmup then cosine to 10%: standard, and stable at this high lr for a tiny model.
        scale = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=gen)
        batch = torch.stack([data[s : s + seq_len] for s in starts])  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 0:
            first = loss.item()
        if step % 100 == 0 or step == steps - 1:
            last = loss.item()
            print(f"  pretrain step {step:5d}  loss {last:.4f}  ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    return first, last


def make_tiny_llama(out_dir: str | Path, *, tied: bool = False, single_file: bool = False,
                    dtype: torch.dtype = torch.bfloat16, pretrain_steps: int = 0, seed: int = 0,
                    n_docs: int = 20000, max_shard_size: str = "800KB") -> Path:
    """Write a tokenizer + LlamaForCausalLM folder to out_dir and return it.

    Defaults give untrained (random) weights in a few seconds, sharded bf16 (>= 3 shards + index).
    tied: tie lm_head to the embeddings. single_file: one model.safetensors, no index.
    pretrain_steps > 0: train on the synthetic corpus first (the committed asset uses 300).
    """
    torch.manual_seed(seed)
    random.seed(seed)
    out = Path(out_dir)
    docs = synthetic_corpus(n_docs, seed=seed)
    tokenizer = build_tokenizer(docs)
    model = build_model(tokenizer, tied=tied, seed=seed)
    if pretrain_steps > 0:
        stream = [i for doc in docs for i in encode_doc(tokenizer, doc)]
        print(f"corpus: {len(docs)} docs, {len(stream)} tokens; vocab {len(tokenizer)}", flush=True)
        first, last = pretrain(model, stream, steps=pretrain_steps, seed=seed)
        print(f"pretraining loss: start {first:.4f} -> end {last:.4f}", flush=True)
    model.to(dtype)
    model.config.dtype = dtype
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="10GB" if single_file else max_shard_size)
    tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------- checks

def check_folder(path: Path) -> None:
    """Reload with the Auto classes and check the tokenizer/chat-template contract; raise on failure."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi! how can i help you today?"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    ids = tok.apply_chat_template(msgs, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    plain = tok(text, add_special_tokens=False)["input_ids"]
    assert text.startswith(BOS) and text.endswith(EOS), text
    assert plain.count(tok.bos_token_id) == 1 and plain[0] == tok.bos_token_id, plain
    assert list(ids) == plain, (ids, plain)
    assert tok.pad_token is None
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n"), prompt
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert plain[: len(prompt_ids)] == prompt_ids, "generation prompt must tokenize as a prefix of the chat"
    assert model.config.bos_token_id == tok.bos_token_id and model.config.eos_token_id == tok.eos_token_id
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            assert module.in_features % 64 == 0, module
    print(f"reload ok: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} params, "
          f"dtype {model.dtype}, vocab {len(tok)}")
    print(f"rendered: {text!r}\nids: {plain}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "assets" / "tiny-llama"))
    parser.add_argument("--steps", type=int, default=300, help="pretraining steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    out = make_tiny_llama(args.out, pretrain_steps=args.steps, seed=args.seed)
    files = sorted(p for p in out.iterdir())
    print(f"wrote {out} in {time.time() - t0:.0f}s: " + ", ".join(f"{p.name} ({p.stat().st_size // 1024} KB)" for p in files))
    check_folder(out)


if __name__ == "__main__":
    main()

"""What the test modules share, imported as `from tests.helpers import ...` (fixtures live in conftest.py):

- the checkpoints: ASSET (the shipped tiny LLaMA) and `write_tiny_llama` (random tiny LLaMAs written on the fly);
- the independent references: transformers + bitsandbytes NF4 loads (causal LM and classifier), PEFT adapters;
- the word-level tokenizer whose ids tests write by hand (`ids`, `make_tokenizer`);
- small helpers: our fp32 CPU load, random token ids, logits, a run that "dies" after a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig, LlamaConfig,
                          LlamaForCausalLM)

from qlora_trainer import quant
from qlora_trainer.loading import load_quantized

REPO = Path(__file__).resolve().parents[1]
ASSET = REPO / "assets" / "tiny-llama"  # the shipped tiny LLaMA (4 layers), trained on data/demo
DEMO = REPO / "data" / "demo"


# ------------------------------------------------------------------------------------------ tiny checkpoints

TINY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)


def write_tiny_llama(out: Path, *, tied: bool = False, shard_size: str | None = "150KB",
                     dtype: torch.dtype = torch.bfloat16, seed: int = 0, **overrides) -> Path:
    """A random tiny LLaMA saved with save_pretrained (sharded unless shard_size is None).

    The defaults are the `tiny_llama` fixture of conftest.py; call this directly only for a variant."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, **overrides}, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).to(dtype)
    kwargs = {"max_shard_size": shard_size} if shard_size else {"max_shard_size": "10GB"}
    model.save_pretrained(out, **kwargs)
    return out


# ------------------------------------------------------------------------------------------ references

def _nf4_config(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def _exact_cpu_kernels(model, device: str) -> None:
    if device != "cpu":
        return
    for module in model.modules():
        if quant.is_nf4_linear(module):
            module.support_avx512bf16_for_cpu = False  # the same exact NF4 path ours takes on CPU


def transformers_nf4(path: Path, compute_dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The ecosystem's reference: transformers + bitsandbytes NF4 with double quantization."""
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=_nf4_config(compute_dtype),
                                                 dtype=compute_dtype, device_map=device)
    _exact_cpu_kernels(model, device)
    return model.eval()


def transformers_nf4_classifier(path: Path, num_labels: int, pad_token_id: int):
    """The reference classifier: transformers' AutoModelForSequenceClassification over bitsandbytes NF4 (fp32)."""
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, pad_token_id=pad_token_id,
                                                               quantization_config=_nf4_config(torch.float32),
                                                               dtype=torch.float32, device_map="cpu")
    _exact_cpu_kernels(model, "cpu")
    return model.eval()


def write_peft_adapter(base: Path, out: Path, *, targets="all-linear", r: int = 8, alpha: float = 16,
                       use_rslora: bool = False, seed: int = 0, b_std: float = 0.05) -> Path:
    """An adapter written by PEFT itself over transformers + bitsandbytes NF4, with random non-zero B."""
    from peft import LoraConfig, get_peft_model

    model = transformers_nf4(base)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=use_rslora,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * b_std)
    peft_model.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------ small helpers

def load_ours(path: Path):
    """Our NF4 load, fp32 compute on CPU, no progress bar."""
    return load_quantized(path, compute_dtype="fp32", device="cpu", progress=False)


def random_ids(vocab: int, *, length: int = 16, seed: int = 0) -> torch.Tensor:
    """(2, length) token ids, the same for the same seed."""
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


def logits_of(model, inputs: torch.Tensor | dict) -> torch.Tensor:
    """fp32 logits without autograd, for input ids (B, T) or a batch dict (input_ids, attention_mask, ...)."""
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits.float()


class Stop(Exception):
    """Raised by `save_then_die`: the run "dies" there."""


def save_then_die(real_save, at_step: int):
    """A stand-in for checkpoint.save_checkpoint: saves as usual, then raises Stop right after step `at_step`'s
    checkpoint, as a process killed at that moment would stop."""
    def save(out, step, *args, **kwargs):
        path = real_save(out, step, *args, **kwargs)
        if step == at_step:
            raise Stop
        return path

    return save


def straight_and_stopped_at_step_2(run_config, tmp_path: Path, monkeypatch) -> None:
    """A 4-step run into tmp_path/straight, and the same run into tmp_path/resumed whose process "dies" right after
    its step-2 checkpoint (`run_config(out)` -> the RunConfig of each)."""
    import pytest

    from qlora_trainer import checkpoint as ckpt
    from qlora_trainer import train as train_mod

    straight = train_mod.train(run_config(tmp_path / "straight"), progress=False, log=lambda *_: None)
    assert straight.steps == 4
    real_save = ckpt.save_checkpoint
    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die(real_save, at_step=2))
    with pytest.raises(Stop):
        train_mod.train(run_config(tmp_path / "resumed"), progress=False, log=lambda *_: None)
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)


def random_lora_b(model, std: float, seed: int = 0) -> None:
    """Random non-zero B (std `std`) in every LoRA layer of `model`, linear and expert, so an adapter changes logits."""
    from qlora_trainer.lora import lora_layers

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * std)


# ------------------------------------------------------------------------------------------ tokenizers

CHAT_TEMPLATE = (  # Llama-3 style: starts with the BOS, assistant turns end with the EOS
    "{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}<|sep|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}</s>{% else %}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant<|sep|>{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|start|>", "<|sep|>", "<|end|>"]
WORDS = ("user assistant system hi hello there what is 2 + 3 5 ok yes no a b c the cat sat dog ran ? "
         "Below an instruction that describes task , paired with input provides further context . Write "
         "response appropriately completes request ### Instruction : Input Response").split()
VOCAB = {t: i for i, t in enumerate(SPECIALS + list(dict.fromkeys(WORDS)))}


def ids(text: str) -> list[int]:
    """Hand-written token ids: whitespace-separated vocabulary entries -> ids (independent of any tokenizer)."""
    return [VOCAB[w] for w in text.split()]


def make_tokenizer(use_bos: bool = True, pad_is_eos: bool = False, chat_template: str | None = CHAT_TEMPLATE):
    """A word-level tokenizer over VOCAB built with `tokenizers` (no files, no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    backend.add_special_tokens(SPECIALS)
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="@@@@")
    if use_bos:  # like Llama: the tokenizer itself prepends <s>
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                               special_tokens=[("<s>", VOCAB["<s>"])])
    kwargs = dict(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", chat_template=chat_template)
    kwargs["bos_token"] = "<s>"
    kwargs["pad_token"] = "</s>" if pad_is_eos else "<pad>"
    return PreTrainedTokenizerFast(**kwargs)

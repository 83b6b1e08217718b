"""Shared fixtures: tiny word-level tokenizers built with `tokenizers` (no files, no network).

Token ids are fixed by VOCAB, so tests can write expected ids by hand: ids("<s> hi </s>") == [1, ..., 2].
"""

import sys
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="session")
def tok():
    """bos <s> (added by the tokenizer), eos </s>, pad <pad>, Llama-3-style template with {{ bos_token }}."""
    return make_tokenizer()


@pytest.fixture(scope="session")
def tok_pad_eos():
    """GPT-2/Qwen-like: pad token is the EOS, no BOS added, a chat template without BOS."""
    return make_tokenizer(use_bos=False, pad_is_eos=True, chat_template=CHAT_TEMPLATE.replace("{{ bos_token }}", ""))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: a second thread gains nothing, and on a busy machine OpenMP's spinning threads make every
    step many times slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    """A random tiny GPT-2 (2 layers, bf16, sharded) made by the asset script."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from make_tiny_gpt2 import make_tiny_gpt2

    return make_tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "m", n_docs=300, n_layer=2, max_shard_size="150KB")

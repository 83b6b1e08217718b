"""Shared fixtures (the helpers they use are in tests/helpers.py) and the `gpu` marker's skip.

Markers (registered in pyproject.toml): `slow` for multi-second runs (`pytest -m "not slow"` is the quick loop),
`gpu` for tests that need CUDA; without a GPU they are skipped, with the reason shown by -ra."""

import sys

import pytest
import torch

from tests.helpers import CHAT_TEMPLATE, REPO, make_tokenizer, write_tiny_llama


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tok():
    """bos <s> (added by the tokenizer), eos </s>, pad <pad>, Llama-3-style template with {{ bos_token }}."""
    return make_tokenizer()


@pytest.fixture(scope="session")
def tok_pad_eos():
    """GPT-2/Qwen-like: pad token is the EOS, no BOS added, a chat template without BOS."""
    return make_tokenizer(use_bos=False, pad_is_eos=True, chat_template=CHAT_TEMPLATE.replace("{{ bos_token }}", ""))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """The random tiny LLaMA of write_tiny_llama's defaults: 2 layers, bf16, seed 0, untied, sharded at 150KB
    (8 files). Written once per session and shared: tests read it, and copy it before changing any file."""
    with torch.random.fork_rng(devices=[]):  # its seed does not leak into the tests that happen to run after it
        return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory):
    """{(arch, layout): folder} for every MoE architecture and layout of scripts/make_tiny_moe.py (random, bf16,
    sharded at 200KB, so one layer's experts span shards): a few seconds for all of them. Read-only: copy first."""
    sys.path.insert(0, str(REPO / "scripts"))
    from make_tiny_moe import LAYOUTS, make_tiny_moe, tokenizer

    root, tok = tmp_path_factory.mktemp("tiny-moe"), tokenizer()
    return {(arch, layout): make_tiny_moe(root / f"{arch}-{layout}", arch, layout, tok=tok)
            for arch, layouts in LAYOUTS.items() if arch != "gemma2" for layout in layouts}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: a second thread gains nothing, and on a busy machine OpenMP's spinning threads make every
    step many times slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A random tiny GPT-2 (2 layers, bf16, sharded) made by the asset script."""
    sys.path.insert(0, str(REPO / "scripts"))
    from make_tiny_gpt2 import make_tiny_gpt2

    return make_tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "m", n_docs=300, n_layer=2, max_shard_size="150KB")

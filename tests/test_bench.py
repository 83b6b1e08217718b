"""scripts/bench.py in its CPU smoke form: ours and the baseline (transformers + bitsandbytes + PEFT) train the
same NF4 weights from the same adapter, so their losses must agree; the table prints; the GPU path's baseline
(random NF4 weights marked as a transformers 4-bit model) is wrapped by PEFT exactly as a from_pretrained one."""

import importlib.util
import json
import math
import sys

import pytest
import torch

from tests.helpers import REPO


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench", None)


def test_quick_run_prints_table_and_equal_losses(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = bench.main(["--quick", "--cpu", "--no-rss", "--json", str(out)])
    table = capsys.readouterr().out
    assert "tok/s" in table and " ours " in table and " baseline " in table
    by_impl = {r.impl: r for r in results}
    assert set(by_impl) == {"ours", "baseline"}
    for r in results:
        assert r.status == "ok" and r.tokens_per_s > 0
        assert all(math.isfinite(x) for x in r.losses)
    assert by_impl["ours"].losses[0] == pytest.approx(by_impl["baseline"].losses[0], rel=1e-5)
    # B = 0 at step 0; the later steps train the adapter, and both sides must take the same steps
    assert by_impl["ours"].losses == pytest.approx(by_impl["baseline"].losses, rel=1e-4)
    saved = json.loads(out.read_text())
    assert saved["meta"]["device"] == "cpu" and len(saved["runs"]) == 2


def _nonzero_b(init):
    """B = 0 makes the adapter invisible at step 0; a random B makes the loss check see it."""
    g = torch.Generator().manual_seed(1)
    return {name: (a, torch.randn(b.shape, generator=g) * 0.05) for name, (a, b) in init.items()}


def test_same_adapter_same_losses_random_weights(bench, monkeypatch):
    """The GPU bench's random-weights path, here at the tiny shape on CPU: ours and the baseline start from one
    adapter with B != 0 and take the same steps, so every loss agrees."""
    model = "random"
    tiny = json.loads((bench.TINY / "config.json").read_text())
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
            "bos_token_id", "eos_token_id")
    shape = dict(bench.LLAMA3, **{k: tiny[k] for k in keys}, num_hidden_layers=2)  # 2 layers: enough, and quick
    monkeypatch.setitem(bench.GPU_MODELS, model, shape)
    cpu = torch.device("cpu")
    ours = bench.make_trainer("ours", model, cpu, torch.float32, 8, None, 16)
    init = _nonzero_b(ours.lora_init())
    bench.load_lora_init(ours.model, init)
    base = bench.make_trainer("baseline", model, cpu, torch.float32, 8, init, 16)
    batch = bench.make_batch(ours.model.config.vocab_size, 2, 24, cpu)
    ours_losses = [ours.step(batch) for _ in range(2)]
    base_losses = [base.step(batch) for _ in range(2)]
    assert ours_losses[0] == pytest.approx(base_losses[0], rel=1e-5)
    assert ours_losses[1] == pytest.approx(base_losses[1], rel=1e-4)
    assert ours_losses[1] < ours_losses[0]  # it trains


def test_random_baseline_is_wrapped_like_from_pretrained(bench):
    """PEFT picks its bnb 4-bit LoRA layer for the random-weights baseline, as it does after from_pretrained."""
    from peft import LoraConfig, get_peft_model

    from qlora_trainer.loading import random_quantized
    from transformers import LlamaConfig

    tiny = json.loads((bench.TINY / "config.json").read_text())
    config = LoraConfig(r=4, target_modules="all-linear")
    loaded = get_peft_model(bench.transformers_from_pretrained(bench.TINY, torch.float32, torch.device("cpu")), config)
    made = random_quantized(LlamaConfig(**tiny), compute_dtype=torch.float32, device="cpu", progress=False)
    made = get_peft_model(bench.as_transformers_4bit(made, torch.float32), config)
    kinds = lambda m: sorted({(n.rsplit(".", 1)[-1], type(x).__name__) for n, x in m.named_modules()  # noqa: E731
                              if hasattr(x, "lora_A")})
    assert kinds(made) == kinds(loaded)
    assert all(name == "Linear4bit" for _, name in kinds(made))


class _FakeTrainer:
    """Runs out of memory above `limit` tokens: stands in for a GPU model in the longest-seq search."""

    def __init__(self, limit):
        self.limit, self.seen = limit, []
        self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    def step(self, batch):
        t = batch["input_ids"].shape[1]
        self.seen.append(t)
        if t > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return 1.0


@pytest.mark.parametrize("start, growth", [(2048, 2.0), (40960, 1.25)])
def test_longest_seq_search(bench, monkeypatch, start, growth):
    monkeypatch.setattr(bench, "free_memory", lambda device: None)  # gc.collect per try: slow, nothing to free
    fake = _FakeTrainer(limit=50_000)
    found = bench.longest_seq(fake, 100, torch.device("cpu"), start, 1024, 1 << 20, budget_s=60, growth=growth)
    assert found["exact"] and found["fits"] <= 50_000 < found["fails"]
    assert found["fails"] - found["fits"] <= max(1024, found["fits"] // 32)
    assert len(fake.seen) <= 12


def test_gpu_table_shows_ratio_memory_estimate_and_mfu(bench):
    R = bench.Result
    rows = [R("ours", "8b", 1, 2048, step_s=1.0, tokens_per_s=2048.0, losses=[12.0], peak_mem_gib=8.0,
              estimate_gib=7.9, mfu=0.31),
            R("baseline", "8b", 1, 2048, step_s=2.0, tokens_per_s=1024.0, losses=[12.0], peak_mem_gib=14.0, mfu=0.15),
            R("baseline", "8b", 1, 8192, status="OOM")]
    text = bench.table(rows, {"device": "cuda", "longest_seq": {"8b/ours": {"fits": 120832, "fails": 122880,
                                                                          "exact": True}}})
    assert "2.00" in text and "7.90" in text and "31.0%" in text and "OOM" in text and "120832" in text

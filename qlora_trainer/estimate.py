"""Peak GPU memory of a QLoRA run, from a model's config.json alone, before anything is loaded.

    qlora-trainer estimate --model /models/llama3-70b --seq-len 4096 --rank 16

The model follows what the trainer does: every decoder nn.Linear stored as bitsandbytes NF4 with double
quantization (blocksize 64), embeddings/norms/lm_head in the compute dtype, fp32 LoRA A (r, in) and
B (out, r) with fp32 grads, gradient checkpointing per decoder layer, and a chunked cross-entropy that
never builds the full (B, T, vocab) logits. All sizes are bytes; N = batch * seq_len tokens.

The peak comes in one of two phases that never overlap: the loss (final norm + one logits chunk) runs
before any layer's backward, and its buffers are freed before the last layer is recomputed. So

    total = weights + LoRA (params, grads, optimizer) + checkpointed inputs
            + max(one layer recomputed for backward, loss) + CUDA overhead.

The per-token activation counts below list the tensors autograd saves in transformers' LlamaDecoderLayer
with our LoRALinear (checked tensor by tensor on CPU by tests/test_estimate.py); the backward transients and
the loss phase are still to calibrate against a measured GPU peak (scripts/bench.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from qlora_trainer.errors import ArgumentError
from qlora_trainer.model_shape import ModelShape, nf4_bytes, shape_from_config
from qlora_trainer.names import ALL_LINEAR, AUTO, DTYPE_BYTES, MODEL_CONFIG_FILE, OPTIMIZERS
from qlora_trainer.paths import looks_like_hub_id

GIB = 1024**3

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
ALL_LINEARS = ATTENTION_LINEARS + MLP_LINEARS
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")  # an MoE layer's 3-D expert weights LoRA may target (expert_lora.py)
TARGETS = ALL_LINEARS + ("gate_up_proj",)  # all-linear: every linear and, in an MoE layer, every expert weight

# bitsandbytes 8-bit optimizers keep tensors under min_8bit_size in fp32; others as uint8 + fp32 absmax
# per 256 values, for each of Adam's two moments.
BNB_MIN_8BIT_SIZE = 4096
BNB_OPTIM_BLOCKSIZE = 256
BNB_QMAPS_BYTES = 2 * 256 * 4  # qmap1 and qmap2, shared by every 8-bit tensor of the optimizer

# Stated constants, not measured here: the CUDA context (+ cuBLAS workspace), which the torch allocator
# does not see, and the caching allocator's fragmentation as a fraction of what tensors hold.
CUDA_CONTEXT_BYTES = int(0.5 * GIB)
ALLOCATOR_OVERHEAD_FRACTION = 0.05


def _loss_bytes_per_logit(act: int) -> int:
    """One loss chunk, per logit: the logits from lm_head in the compute dtype, their fp32 copy, the fp32
    softmax/grad, and the grad cast back for lm_head's backward (12 bytes for bf16)."""
    return act + 4 + 4 + act


@dataclass(frozen=True)
class RunSettings:
    """What a run trains with; a bad value is an ArgumentError naming the field (the CLI names its flag)."""

    seq_len: int = 2048
    batch_size: int = 1
    rank: int = 16
    targets: tuple[str, ...] = ALL_LINEARS
    optimizer: str = "paged_adamw_8bit"  # one of names.OPTIMIZERS
    loss_chunk_size: int = 1024
    compute_dtype: str = "bf16"
    lora_dropout: float = 0.05

    def __post_init__(self) -> None:
        for field in ("seq_len", "batch_size", "rank", "loss_chunk_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ArgumentError(field, f"{{arg}} must be a positive integer, got {value!r}")
        object.__setattr__(self, "targets", parse_targets(self.targets))
        if self.optimizer not in OPTIMIZERS:
            raise ArgumentError("optimizer", f"{{arg}} {self.optimizer!r} is not known; choose one of "
                                             f"{', '.join(OPTIMIZERS)}")
        if self.compute_dtype not in DTYPE_BYTES:
            raise ArgumentError("compute_dtype", f"{{arg}} {self.compute_dtype!r} is not known; choose one of "
                                                 f"{', '.join(DTYPE_BYTES)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ArgumentError("lora_dropout", f"{{arg}} must be in [0, 1), got {self.lora_dropout!r}")

    @property
    def tokens(self) -> int:
        return self.seq_len * self.batch_size


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per part of a run's peak GPU memory; `total` is what must fit in the card."""

    quantized_weights: int
    dense_weights: int  # embeddings + lm_head (unless tied) + norms
    lora_params: int
    lora_grads: int
    optimizer_state: int
    checkpointed_inputs: int
    layer_recompute: int  # one layer's saved activations + backward transients (peaks apart from the loss)
    loss_chunk: int  # final norm + one logits chunk (peaks apart from the layer recompute)
    cuda_overhead: int
    lora_param_count: int

    @property
    def allocated(self) -> int:
        """What tensors hold at the peak: compare with torch.cuda.max_memory_allocated(), which does not see
        the CUDA context nor a paged optimizer's state buffers of >= 1e5 elements (bnb allocates those
        as CUDA managed memory, outside torch's allocator)."""
        return (self.quantized_weights + self.dense_weights + self.lora_params + self.lora_grads
                + self.optimizer_state + self.checkpointed_inputs + max(self.layer_recompute, self.loss_chunk))

    @property
    def total(self) -> int:
        return self.allocated + self.cuda_overhead


# ---------------------------------------------------------------------------------------------- config

# RunSettings field -> the key of a training config (config.RunConfig) it is read from by `estimate CONFIG.yaml`.
CONFIG_KEYS = {"seq_len": "data.max_seq_len", "batch_size": "train.batch_size", "rank": "lora.r",
               "targets": "lora.targets", "optimizer": "train.optimizer", "loss_chunk_size": "train.loss_chunk_size",
               "compute_dtype": "model.compute_dtype", "lora_dropout": "lora.dropout"}
GPU_COMPUTE_DTYPE = "bf16"  # what model.compute_dtype "auto" means on a GPU


def settings_from_config(cfg: Any) -> dict[str, Any]:
    """RunSettings keywords from a training config (a config.RunConfig), read at CONFIG_KEYS; compute_dtype "auto"
    is bf16, what a GPU run computes in."""
    values = {}
    for field, key in CONFIG_KEYS.items():
        section, name = key.split(".")
        values[field] = getattr(getattr(cfg, section), name)
    if values["compute_dtype"] == AUTO:
        values["compute_dtype"] = GPU_COMPUTE_DTYPE
    return values



def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """'all-linear', 'q_proj,v_proj' or a list of names -> the names, in layer order."""
    if isinstance(targets, str):
        targets = TARGETS if targets == ALL_LINEAR else [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ArgumentError("targets", f"{{arg}}: unknown or empty {unknown or list(targets)}; use {ALL_LINEAR} or "
                                       f"names from {', '.join(TARGETS)}")
    return tuple(t for t in TARGETS if t in targets)


def read_config_json(model: str | Path) -> tuple[dict[str, Any], Path]:
    """(config.json as a dict, its path) of a model folder, a config.json path, or a hub id already in the local
    cache. Plain JSON: estimate needs no torch and no transformers."""
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / MODEL_CONFIG_FILE
        if not path.is_file():
            raise ArgumentError("model", f"{{arg}} {model}: the folder has no config.json")
    elif not path.is_file():
        path = _config_from_hub_cache(str(model))
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArgumentError("model", f"{{arg}} {model}: cannot read {path} as JSON ({err})") from None
    if not isinstance(config, dict):
        raise ArgumentError("model", f"{{arg}} {model}: {path} is not a JSON object")
    return config, path


def _config_from_hub_cache(model: str) -> Path:
    if looks_like_hub_id(model):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, MODEL_CONFIG_FILE)
        if isinstance(cached, str):
            return Path(cached)
    raise ArgumentError("model", f"{{arg}} {model}: no such folder or config.json, and no hub id of that name in "
                                 "the local cache; pass a model folder or its config.json")


def _as_shape(model: ModelShape | Mapping[str, Any]) -> ModelShape:
    return model if isinstance(model, ModelShape) else shape_from_config(model)


# ------------------------------------------------------------------------------------------- the terms


def lora_tensor_sizes(shape: ModelShape, run: RunSettings) -> list[int]:
    """numel of every LoRA tensor: A (r, in) and B (out, r) per targeted linear per layer, and on an MoE layer's
    targeted expert weights PEFT's target_parameters factors, A (r*E, in) and B (out, r*E) (expert_lora.py)."""
    linears = shape.linear_shapes()
    per_layer = [n for t in run.targets if t in linears for n in (run.rank * linears[t][1], linears[t][0] * run.rank)]
    if shape.experts:
        h, i, rank_e = shape.hidden, shape.expert_intermediate, run.rank * shape.experts
        experts = {"gate_up_proj": (2 * i, h), "down_proj": (h, i)}  # (out, in) of one expert
        per_layer += [n for t in EXPERT_WEIGHTS if t in run.targets
                      for n in (rank_e * experts[t][1], experts[t][0] * rank_e)]
    return per_layer * shape.layers


def optimizer_state_bytes(sizes: Sequence[int], optimizer: str) -> int:
    """AdamW keeps two moments per parameter: fp32 (8 B/param), or in bitsandbytes 8-bit form uint8 + an
    fp32 absmax per 256 values each, with tensors under 4096 elements left in fp32; the 8-bit tensors share
    the two 256-entry fp32 quantization maps (signed and unsigned dynamic), one pair per optimizer.
    torch AdamW's per-parameter `step` is a CPU scalar (not fused, not capturable): no GPU memory."""
    if optimizer == "adamw":
        return 8 * sum(sizes)
    eight_bit = [n for n in sizes if n >= BNB_MIN_8BIT_SIZE]
    qmaps = BNB_QMAPS_BYTES if eight_bit else 0
    return (sum(8 * n for n in sizes if n < BNB_MIN_8BIT_SIZE) + qmaps
            + sum(2 * (n + 4 * math.ceil(n / BNB_OPTIM_BLOCKSIZE)) for n in eight_bit))


def layer_saved_bytes_per_token(shape: ModelShape, run: RunSettings) -> int:
    """Bytes per token that autograd saves when one LlamaDecoderLayer is recomputed for its backward, with the
    4-bit base frozen (bnb's MatMul4Bit keeps only the packed weight), frozen norm weights, SDPA on the flash
    kernel with no attention mask (GQA inside the kernel), and our LoRALinear on `run.targets`. Measured
    tensor by tensor on CPU in tests/test_estimate.py. A tensor is counted once however many ops save it."""
    h, i, q, kv, a = shape.hidden, shape.mlp_width, shape.q_dim, shape.kv_dim, DTYPE_BYTES[run.compute_dtype]
    targets, dropout = set(run.targets), run.lora_dropout > 0

    def saved_by_lora(*names: str) -> bool:  # a LoRALinear without dropout saves its input for x @ A.T's grad
        return not dropout and bool(targets.intersection(names))

    # RMSNorm saves its fp32 input and rsqrt (fp32, one per token); `weight * x` with a frozen weight saves only
    # the weight, so the normalized x is not kept, and the norm's output only if a consumer saves it.
    # In fp32 the upcast is a no-op: input_layernorm's fp32 input is then the layer input, which the
    # checkpoint keeps already; post_attention_layernorm's is the residual sum, a tensor of its own.
    attention = (
        (0 if run.compute_dtype == "fp32" else 4 * h) + 4  # input_layernorm: fp32 copy of the layer input, rsqrt
        + (a * h if saved_by_lora("q_proj", "k_proj", "v_proj") else 0)  # its output
        + a * (q + 2 * kv)  # SDPA's inputs: rotated q, k and v (RoPE's muls save only cos and sin)
        + a * q + 4 * shape.heads  # SDPA's output, laid out (B, T, heads, head_dim): o_proj's input is the
        # same storage; the fp32 logsumexp per head
    )
    mlp = (
        4 * h + 4  # post_attention_layernorm: the fp32 residual sum (a copy unless fp32), rsqrt
        + (a * h if saved_by_lora("gate_proj", "up_proj") else 0)  # its output
        + 3 * a * i  # gate (silu's input), up and silu(gate) (the product's inputs)
        + (a * i if saved_by_lora("down_proj") else 0)  # silu(gate) * up, down_proj's input
    )
    linears = shape.linear_shapes()
    lora_inputs = sum(linears[t][1] for t in run.targets if t in linears)
    # each LoRALinear applies its own dropout: the dropped copy of its input + a bool mask (CUDA's fused
    # dropout; CPU's unfused one keeps the mask in the compute dtype)
    lora = (a + 1) * lora_inputs if dropout else 0
    lora += a * run.rank * len(set(run.targets) & set(linears))  # x @ A.T, saved for B's grad
    return attention + mlp + lora


def layer_backward_bytes_per_token(shape: ModelShape, run: RunSettings) -> int:
    """Gradients alive at once inside a layer's backward: the incoming and outgoing (B, T, hidden) grads,
    and three (B, T, intermediate) grads in the MLP (of silu(gate) * up, of silu(gate) and of up)."""
    a = DTYPE_BYTES[run.compute_dtype]
    return 2 * a * shape.hidden + 3 * a * shape.mlp_width


def dequantized_weight_bytes(shape: ModelShape, run: RunSettings) -> int:
    """bnb dequantizes a 4-bit weight to the compute dtype for each matmul; the largest one, transiently. NF4
    experts likewise, one expert's weight at a time (experts.py: the backward dequantizes them again)."""
    a = DTYPE_BYTES[run.compute_dtype]
    return a * max([o * i for o, i in shape.linear_shapes().values()] + [2 * shape.expert_intermediate * shape.hidden])


def loss_bytes(shape: ModelShape, run: RunSettings) -> int:
    """Chunked cross-entropy: the final RMSNorm's saved tensors and the grad of the hidden states for all
    N tokens, plus one chunk's (chunk, vocab) logits and their grad."""
    a = DTYPE_BYTES[run.compute_dtype]
    per_token = (4 * shape.hidden + 2 * a * shape.hidden) + a * shape.hidden
    chunk = min(run.loss_chunk_size, run.tokens)
    return run.tokens * per_token + chunk * shape.vocab * _loss_bytes_per_logit(a)


# ------------------------------------------------------------------------------------------- estimate


def estimate_memory(model: ModelShape | Mapping[str, Any], run: RunSettings | None = None) -> MemoryBreakdown:
    """Peak GPU memory of training `model` (a ModelShape or a config.json dict) with `run`."""
    shape, run = _as_shape(model), run or RunSettings()
    a, n = DTYPE_BYTES[run.compute_dtype], run.tokens

    quantized = shape.layers * (sum(nf4_bytes(o * i) for o, i in shape.linear_shapes().values())
                                + shape.expert_weight_bytes()
                                + (nf4_bytes(shape.hidden) if shape.shared_intermediate else 0))  # its sigmoid gate
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2)  # embed_tokens (+ lm_head)
    norms = (2 * shape.layers + 1) * shape.hidden  # two RMSNorms per layer + the final one
    norms += shape.layers * shape.router_params()  # and, full precision too, MoE routers and expert biases
    lora_sizes = lora_tensor_sizes(shape, run)
    lora_count = sum(lora_sizes)

    # each layer's input (B, T, hidden) is kept, plus RoPE's cos and sin (B, T, head_dim) shared by all
    checkpointed = n * (shape.layers * a * shape.hidden + 2 * a * shape.head_dim)
    recompute = (n * (layer_saved_bytes_per_token(shape, run) + layer_backward_bytes_per_token(shape, run))
                 + dequantized_weight_bytes(shape, run))

    parts = dict(
        quantized_weights=quantized,
        dense_weights=a * (embeddings + norms),
        lora_params=4 * lora_count,  # fp32 master weights
        lora_grads=4 * lora_count,  # fp32
        optimizer_state=optimizer_state_bytes(lora_sizes, run.optimizer),
        checkpointed_inputs=checkpointed,
        layer_recompute=recompute,
        loss_chunk=loss_bytes(shape, run),
    )
    allocated = sum(v for k, v in parts.items() if k not in ("layer_recompute", "loss_chunk"))
    allocated += max(parts["layer_recompute"], parts["loss_chunk"])
    overhead = CUDA_CONTEXT_BYTES + int(ALLOCATOR_OVERHEAD_FRACTION * allocated)
    return MemoryBreakdown(**parts, cuda_overhead=overhead, lora_param_count=lora_count)


def _largest_that_fits(fits, limit: int = 1 << 24) -> int:
    """Largest x in [1, limit] with fits(x) (fits is monotone: true, then false), or 0 if none."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)  # fits(lo) is true; fits(hi) is false or hi is past the limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def max_seq_len_that_fits(gpu_gib: float, model: ModelShape | Mapping[str, Any], run: RunSettings | None = None) -> int:
    """Longest seq_len (at run.batch_size) whose estimated total fits in gpu_gib GiB; 0 if none does."""
    shape, run = _as_shape(model), run or RunSettings()
    budget = gpu_gib * GIB
    return _largest_that_fits(lambda t: estimate_memory(shape, dataclasses.replace(run, seq_len=t)).total <= budget)


def max_batch_that_fits(gpu_gib: float, model: ModelShape | Mapping[str, Any], run: RunSettings | None = None) -> int:
    """Largest batch_size (at run.seq_len) whose estimated total fits in gpu_gib GiB; 0 if none does."""
    shape, run = _as_shape(model), run or RunSettings()
    budget = gpu_gib * GIB
    return _largest_that_fits(lambda b: estimate_memory(shape, dataclasses.replace(run, batch_size=b)).total <= budget)


def format_table(b: MemoryBreakdown, shape: ModelShape, run: RunSettings) -> str:
    """The breakdown as aligned GiB rows."""
    rows = [
        ("base linears" + (" + experts" if shape.experts else "") + ", NF4 + double quant", b.quantized_weights),
        (f"embeddings + lm_head + norms{' + routers' if shape.experts else ''} ({run.compute_dtype})",
         b.dense_weights),
        (f"LoRA parameters (fp32, {b.lora_param_count / 1e6:.1f}M)", b.lora_params),
        ("LoRA gradients (fp32)", b.lora_grads),
        (f"optimizer state ({run.optimizer})", b.optimizer_state),
        (f"activations: {shape.layers} checkpointed layer inputs", b.checkpointed_inputs),
        ("activations: one layer recomputed *", b.layer_recompute),
        (f"loss: final norm + {min(run.loss_chunk_size, run.tokens)}-token logits chunk *", b.loss_chunk),
        ("CUDA context + allocator overhead", b.cuda_overhead),
    ]
    width = max(len(label) for label, _ in rows)
    targeted = len(set(run.targets) & set(shape.linear_shapes()))  # a MoE layer has no dense MLP linears
    head = (f"{shape.model_type}: hidden {shape.hidden}, {shape.layers} layers, vocab {shape.vocab} | "
            f"seq {run.seq_len} x batch {run.batch_size}, r {run.rank} on {targeted} linears/layer")
    lines = [head, f"{'':{width}}   GiB"]
    lines += [f"{label:<{width}} {value / GIB:6.2f}" for label, value in rows]
    lines.append(f"{'total (peak)':<{width}} {b.total / GIB:6.2f}")
    lines.append("* these two peak at different times; the total counts the larger")
    return "\n".join(lines)

"""The project's shared vocabulary, in one place: dtype, optimizer and task names, target keywords, file names.

Plain Python, no torch at import time, so the CLI's --help, config validation and `estimate` stay light.
"""

from __future__ import annotations

import math

# ------------------------------------------------------------------------------------------ dtypes

DTYPE_NAMES = ("bf16", "fp16", "fp32")  # what users write (model.compute_dtype, --dtype, qlora_trainer.json)
AUTO = "auto"  # compute dtype: bf16 on GPU, fp32 on CPU
COMPUTE_DTYPES = (AUTO,) + DTYPE_NAMES
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
CONFIG_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # config.json's `dtype` values


def torch_dtype(name: str):
    """"bf16" -> torch.bfloat16 (ValueError for a name outside DTYPE_NAMES)."""
    import torch

    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name not in table:
        raise ValueError(f"unknown dtype name {name!r}: use one of {', '.join(DTYPE_NAMES)}")
    return table[name]


def dtype_name(dtype) -> str | None:
    """torch.bfloat16 -> "bf16"; None for a dtype without a short name."""
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype)


# ------------------------------------------------------------------------------------------ training

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")  # torch AdamW; bitsandbytes 8-bit (paged) AdamW
SCHEDULES = ("cosine", "linear", "constant")
# train.report_to: experiment trackers (through accelerate), and the pip package each needs.
NO_TRACKER = "none"
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
TRACKERS = (NO_TRACKER,) + tuple(TRACKER_PACKAGES)
TENSORBOARD_DIR = "tensorboard"  # OUT/tensorboard: the TensorBoard event files
IGNORE_INDEX = -100  # label of a token that has no loss (transformers' convention)

# ------------------------------------------------------------------------------------------ tasks

CAUSAL_LM = "causal_lm"
CLASSIFICATION = "classification"
TASKS = (CAUSAL_LM, CLASSIFICATION)
# PEFT's task_type for each task, as written in adapter_config.json.
PEFT_TASK_TYPES = {CAUSAL_LM: "CAUSAL_LM", CLASSIFICATION: "SEQ_CLS"}
# model.attn_implementation: auto = sdpa where transformers has it for the architecture, else what it has (eager).
ATTN_IMPLEMENTATIONS = (AUTO, "sdpa", "eager", "flash_attention_2")
DATA_FORMATS = ("text", "alpaca", "completion", "chat", "classification")

# ------------------------------------------------------------------------------------------ LoRA and NF4

ALL_LINEAR = "all-linear"  # every linear layer but the output layer (PEFT's keyword)
MERGE_INTO = ("dequantized", "original")  # what merge adds the update to: the NF4-rounded or the original weights
NF4_BLOCKSIZE = 64  # values per NF4 block; bitsandbytes' CPU kernels need in_features to be a multiple
# The 3-D expert parameters of transformers 5's MoE modules that LoRA may target (PEFT's target_parameters), in the
# order those modules register them, which is the order PEFT nests its wrappers in (see expert_lora.py).
EXPERT_PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """LoRA's update scale: alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT's rule)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


# ------------------------------------------------------------------------------------------ files

MODEL_CONFIG_FILE = "config.json"
MODEL_WEIGHTS_FILE = "model.safetensors"
MODEL_INDEX_FILE = "model.safetensors.index.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_RECORD_FILE = "qlora_trainer.json"  # ours, beside PEFT's files: base fingerprint, compute dtype, labels
RUN_CONFIG_FILE = "config.yaml"  # OUT/config.yaml: the fully resolved config of a run
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT_FILE = "loss.png"
HOST_MEMORY_FILE = "host_memory.json"  # OUT/host_memory.json: peak host memory of each phase of the run
ADAPTER_DIR = "adapter"  # OUT/adapter
CHECKPOINTS_DIR = "checkpoints"  # OUT/checkpoints/step-NNNNNN

"""qlora-trainer: QLoRA fine-tuning on one GPU: NF4 base through bitsandbytes, our own LoRA, PEFT-layout adapters."""

__version__ = "0.1.0"

"""qlora-trainer: QLoRA fine-tuning on one GPU: NF4 base through bitsandbytes, our own LoRA, PEFT-layout adapters.

The public Python API is `qlora_trainer.api` (kept out of this file so that the command line's --help does not
load torch).
"""

__version__ = "0.1.0"

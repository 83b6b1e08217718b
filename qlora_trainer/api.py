"""The public Python API, in one import: `from qlora_trainer.api import load_quantized, apply_lora, train, ...`.

    load_quantized(path, compute_dtype=, device=, task=, num_labels=)   a model folder as NF4, ready for LoRA
    apply_lora(model, targets, r=, alpha=, dropout=)                    wrap its linears in our LoRA layers
    save_adapter(model, folder, base_model_name_or_path=)              the LoRA layers in PEFT's layout
    load_adapter_into(model, folder) / read_adapter(folder)             an adapter (ours or PEFT's) onto a base
    load_config(path, overrides) -> RunConfig                           a YAML config with key=value overrides
    train(cfg) -> TrainResult; Run(cfg)                                 a training run, whole or step by step
    merge(base, adapter, out) / verify(base, adapter, merged)           a standard transformers model folder
    load_for_generation(base, adapter) / generate(model, tokenizer, prompt)
    evaluate_dataset(base, adapter, data_config(path, adapter=adapter))  loss, perplexity (accuracy) on a dataset
    estimate_memory(config_json_dict, RunSettings(...))                 GPU memory of a run, before it runs
    UserError                                                            the one exception a user should see

Everything else is reachable from its module, but may change without notice.
"""

from qlora_trainer.adapter import load_adapter_into, read_adapter, save_adapter
from qlora_trainer.config import RunConfig, load_config
from qlora_trainer.errors import UserError
from qlora_trainer.estimate import RunSettings, estimate_memory
from qlora_trainer.evaluation import data_config, evaluate_dataset
from qlora_trainer.generate import generate, load_for_generation
from qlora_trainer.loading import load_quantized
from qlora_trainer.lora import apply_lora
from qlora_trainer.merge import merge
from qlora_trainer.train import Run, TrainResult, train
from qlora_trainer.verify import verify

__all__ = ["load_quantized", "apply_lora", "save_adapter", "load_adapter_into", "read_adapter", "RunConfig",
           "load_config", "train", "Run", "TrainResult", "merge", "verify", "generate", "load_for_generation",
           "evaluate_dataset", "data_config", "RunSettings", "estimate_memory", "UserError"]

"""What is being trained: one Task object per kind of model (tasks/base.py has the interface).

    causal_lm       a language model: next-token loss on the trained tokens, eval loss
    classification  a sequence classifier: transformers' head trained in full beside LoRA, accuracy and macro-F1

train, merge and inspect talk to a task only through its interface, never to each other; adding a task (a reward
model, preference tuning) means adding one file here and one entry below.
"""

from __future__ import annotations

from qlora_trainer.tasks.base import Task
from qlora_trainer.tasks.causal_lm import CausalLM
from qlora_trainer.tasks.classification import Classification

TASKS: dict[str, Task] = {task.name: task for task in (CausalLM(), Classification())}


def get(name: str) -> Task:
    """The task of a model.task name (causal_lm, classification)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: one of {', '.join(TASKS)}")
    return TASKS[name]


def for_adapter(adapter) -> Task:
    """The task an adapter was trained for (from its task_type: SEQ_CLS is a classifier, anything else a causal LM)."""
    return TASKS[adapter.task]


__all__ = ["Task", "TASKS", "get", "for_adapter"]

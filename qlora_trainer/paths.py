"""Where the paths of a run point: config paths made absolute against their file (or the current folder, for
overrides), hub ids (org/name) kept as they are, and the run folder an adapter belongs to.

Plain Python and YAML, no torch: config validation, `estimate` and the CLI's --help use it.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from qlora_trainer.names import RUN_CONFIG_FILE


# Keys that hold a path, and those of them that may instead name a hub id already in the local cache.
PATH_KEYS = ("model.path", "data.path", "data.eval_path", "out")
HUB_ID_KEYS = ("model.path", "data.path", "data.eval_path")


def looks_like_hub_id(text: str) -> bool:
    """`org/name`: one slash, both parts non-empty, not starting with / . or ~."""
    org, _, name = text.partition("/")
    return text.count("/") == 1 and bool(org) and bool(name) and not text.startswith(("/", ".", "~"))


def _may_be_hub_id(key: str, text: str) -> bool:
    # A data file name with an extension is a file to data.load_rows (`data/train.jsonl`), never a dataset id.
    return looks_like_hub_id(text) and (key == "model.path" or not os.path.splitext(text)[1])


def resolve_path(key: str, value, base_dir: str | os.PathLike):
    """The value of path key `key` made absolute against `base_dir` (`~` expanded). A value that names nothing
    there but looks like a hub id (org/name) stays as given; non-strings and absolute paths stay as they are."""
    if key not in PATH_KEYS or not isinstance(value, str) or not value:
        return value
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        return expanded
    candidate = os.path.abspath(os.path.join(base_dir, expanded))
    if key in HUB_ID_KEYS and not os.path.exists(candidate) and _may_be_hub_id(key, value):
        return value
    return candidate


def run_config_file(adapter_dir: str | os.PathLike) -> Path | None:
    """The config.yaml of the run an adapter folder belongs to (OUT/adapter, OUT/checkpoints/step-N), or None."""
    folder = Path(adapter_dir)
    for run_dir in (folder.parent, folder.parent.parent.parent):
        if (run_dir / RUN_CONFIG_FILE).is_file():
            return run_dir / RUN_CONFIG_FILE
    return None


def recorded_compute_dtype(file: Path) -> str | None:
    """model.compute_dtype of a run's config.yaml (None if it cannot be read)."""
    try:
        return yaml.safe_load(file.read_text(encoding="utf-8"))["model"]["compute_dtype"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None

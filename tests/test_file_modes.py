"""Everything we write gets the modes a plain mkdir/open gives under the user's umask: readable by the group and
others under 022, private under 077 (the temporary folder an atomic write renames into place must not keep
mkdtemp's 0700)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from qlora_trainer import atomic
from qlora_trainer.cli import main
from tests.helpers import ASSET, DEMO


def _modes_off_the_umask(root: Path, umask: int) -> list[str]:
    wrong = []
    for path in [root, *sorted(root.rglob("*"))]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        wanted = (0o777 if path.is_dir() else 0o666) & ~umask
        if mode != wanted:
            wrong.append(f"{path.relative_to(root)}: {oct(mode)}, wanted {oct(wanted)}")
    return wrong


@pytest.fixture
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


@pytest.mark.parametrize("umask", [0o022, 0o077], indirect=True)
def test_atomic_folder_and_copied_file_follow_the_umask(tmp_path, umask):
    root = tmp_path / "root"
    root.mkdir()
    source = tmp_path / "read-only.json"
    source.write_text("{}")
    source.chmod(0o444)  # e.g. a file in the Hugging Face cache

    def write(folder: Path) -> None:
        (folder / "a.txt").write_text("a")
        (folder / "sub").mkdir()
        (folder / "sub" / "b.bin").write_bytes(b"b")
        (folder / "copied.json").write_bytes(source.read_bytes())
        os.chmod(folder / "copied.json", 0o444)  # what shutil.copy2 of that file gives

    atomic.write_folder(root / "out", write)
    atomic.write_folder(root / "out", write)  # replacing an existing folder too
    atomic.write_text(root / "file.txt", "x")
    assert _modes_off_the_umask(root, umask) == []


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o077], indirect=True)
def test_train_merge_inspect_outputs_follow_the_umask(tmp_path, umask, one_thread):
    root = tmp_path / "root"
    root.mkdir()
    train_rows = (DEMO / "train.jsonl").read_text().splitlines()[:16]
    (root / "train.jsonl").write_text("\n".join(train_rows) + "\n")
    (root / "eval.jsonl").write_text("\n".join((DEMO / "eval.jsonl").read_text().splitlines()[:4]) + "\n")
    (root / "run.yaml").write_text(
        f"model: {{path: {ASSET}, compute_dtype: fp32}}\nlora: {{r: 4, alpha: 8}}\n"
        f"data: {{path: {root / 'train.jsonl'}, eval_path: {root / 'eval.jsonl'}, format: chat, max_seq_len: 64}}\n"
        "train: {max_steps: 2, batch_size: 4, grad_accum: 1, optimizer: adamw, lr: 1.0e-3, warmup_steps: 1, "
        f"save_every: 1, eval_every: 2, log_every: 1}}\nout: {root / 'run'}\n")
    run = root / "run"
    assert main(["train", str(root / "run.yaml")]) == 0
    assert main(["merge", "--base", str(ASSET), "--adapter", str(run / "adapter"), "--out", str(root / "merged")]) == 0
    assert main(["inspect", str(run / "adapter"), "--truncate-rank", "2", "--out", str(root / "adapter-r2")]) == 0
    assert main(["inspect", str(run / "adapter"), "--plot", str(root / "spectra.png")]) == 0

    written = {str(p.relative_to(root)) for p in root.rglob("*")}
    assert {"run/config.yaml", "run/metrics.jsonl", "run/loss.png", "run/.lock", "run/adapter",
            "run/adapter/adapter_model.safetensors", "run/checkpoints/step-000002/optimizer.pt",
            "run/checkpoints/step-000002/trainer_state.json", "merged/config.json",
            "merged/model.safetensors.index.json", "adapter-r2/adapter_model.safetensors",
            "spectra.png"} <= written, sorted(written)
    assert any(name.startswith("merged/model-") for name in written)
    assert _modes_off_the_umask(root, umask) == []

"""More than one process (`accelerate launch`, gloo on CPU, 2 processes of one thread each), against the one-process
run as the reference: the same config trains the same model whatever the number of processes (distributed.py).

Every launch is a real `accelerate launch --config_file configs/accelerate/{ddp,fsdp}.yaml` of `python -m
qlora_trainer train`, so the shipped accelerate configs and the README's commands are what is tested."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from qlora_trainer import cli
from qlora_trainer.adapter import load_adapter_into
from qlora_trainer.distributed import World, check_batch, eval_share, rank_share
from qlora_trainer.errors import UserError
from tests.helpers import ASSET, REPO, load_ours, logits_of, random_ids, transformers_nf4

# 33 of the 32 training examples, 8 a step: 5 steps, the last one a single example, which leaves rank 1 of 2 only
# a weight-0 stand-in (distributed.rank_share)
STEPS = 5
RUN = dict(lora={"r": 4, "alpha": 8, "dropout": 0.0},  # no dropout: its masks are per rank (a random stream each)
           train={"epochs": 33 / 32, "batch_size": 4, "grad_accum": 2, "optimizer": "adamw", "lr": 2e-3,
                  "warmup_steps": 1, "save_every": 2, "eval_every": 2, "log_every": 1, "keep_checkpoints": 3})
EVAL_ROWS = 9  # 2 processes evaluate 4 and 5 of them in batches of 4: rank 0 runs a stand-in batch (eval_share)
AUDIT = """\
import os, sys
_log = os.environ.get("AUDIT_DIR")
if _log and "RANK" in os.environ:  # the training processes, not the launcher
    _out, _rank = os.environ["AUDIT_OUT"], os.environ["RANK"]
    _file = open(os.path.join(_log, f"rank{_rank}-{os.getpid()}.txt"), "a", buffering=1)
    def _hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode = args[1] if isinstance(args[1], str) else ""
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            writes = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            paths = [args[0]] if writes else []
        elif event in ("os.mkdir", "os.remove", "os.rename", "os.rmdir", "shutil.rmtree", "os.truncate"):
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        else:
            return
        for p in paths:
            p = os.path.abspath(os.fsdecode(p))
            if p.startswith(_out):
                _file.write(event + " " + p + "\\n")
    sys.addaudithook(_hook)
"""


def workspace(root: Path, **changes) -> Path:
    """32 chat examples of the demo data and the shipped tiny LLaMA; a config whose runs take seconds."""
    root.mkdir(parents=True, exist_ok=True)
    demo = REPO / "data" / "demo"
    (root / "train.jsonl").write_text("\n".join((demo / "train.jsonl").read_text().splitlines()[:32]) + "\n")
    (root / "eval.jsonl").write_text("\n".join((demo / "eval.jsonl").read_text().splitlines()[:EVAL_ROWS]) + "\n")
    config = {"model": {"path": str(ASSET), "compute_dtype": "fp32"},
              "data": {"path": str(root / "train.jsonl"), "format": "chat", "max_seq_len": 64,
                       "eval_path": str(root / "eval.jsonl")},
              "lora": dict(RUN["lora"]), "train": dict(RUN["train"]), "out": str(root / "unused")}
    for section, values in changes.items():
        config[section].update(values)
    path = root / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def launch(config: Path, out: Path, *args: str, kind: str = "ddp", n: int = 2, audit: Path | None = None,
           wait: bool = True):
    """`accelerate launch --config_file configs/accelerate/KIND.yaml --num_processes N -m qlora_trainer train`."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / f"{kind}.yaml"), "--num_processes", str(n),
               "-m", "qlora_trainer", "train", str(config), f"out={out}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    if audit is not None:
        audit.mkdir(parents=True, exist_ok=True)
        (audit / "sitecustomize.py").write_text(AUDIT)
        env.update(PYTHONPATH=f"{audit}{os.pathsep}{REPO}", AUDIT_DIR=str(audit), AUDIT_OUT=str(out.resolve()))
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    if not wait:
        return proc
    output, _ = proc.communicate(timeout=300)
    return proc.returncode, output


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def eval_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}


def same_evals(out: Path, reference: Path) -> bool:
    """The eval losses of a run whose processes shared the eval set are the one-process run's (to its rounding)."""
    ours, theirs = eval_losses(out), eval_losses(reference)
    return ours.keys() == theirs.keys() == {2, 4, 5} and max(abs(ours[s] - theirs[s]) for s in ours) < 2e-6


def adapter_diff(a: Path, b: Path) -> float:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def bitwise_equal(a: Path, b: Path) -> bool:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, one_thread):
    """The reference: one process, the whole batch (in this process)."""
    root = tmp_path_factory.mktemp("one")
    config = workspace(root)
    assert cli.main(["train", str(config), f"out={root / 'out'}"]) == 0
    return config, root / "out"


# ------------------------------------------------------------------------------------------ the rules, unit-sized

def test_each_rank_takes_its_own_slice_and_together_they_take_the_whole_batch():
    micro = [[7, 3, 9, 1], [4, 0, 2, 8]]
    shares = [rank_share(micro, 4, World(rank, 2)) for rank in range(2)]
    assert [[idx for idx, _ in s] for s in shares] == [[[7, 3], [4, 0]], [[9, 1], [2, 8]]]
    short = [[5, 6, 1]]  # train.epochs' last step: rank 1 gets one example, rank 3 of 4 a weight-0 stand-in
    assert [rank_share(short, 4, World(r, 4))[0] for r in range(4)] == [([5], 1.0), ([6], 1.0), ([1], 1.0),
                                                                         ([5], 0.0)]
    assert rank_share(micro, 4, World()) == [(mb, 1.0) for mb in micro]


@pytest.mark.parametrize("n", [0, 1, 3, 9, 16, 17])
def test_the_ranks_evaluate_every_example_once_and_run_as_many_forwards(n):
    examples = [{"id": i} for i in range(n)]
    for size in (2, 3):
        seen, forwards = [], set()
        for rank in range(size):
            share, stand_ins = eval_share(examples, 4, World(rank, size))
            batches = [share[a:a + 4] for a in range(0, len(share), 4)]
            seen += [e["id"] for batch in batches for e in batch]
            forwards.add(len(batches) + stand_ins)
        assert seen == list(range(n))  # in order, none twice, none left out
        assert len(forwards) == 1  # FSDP gathers inside every forward: no rank may wait for a forward never run
    assert eval_share(examples, 4, World()) == (examples, 0)


def test_a_batch_that_does_not_split_among_the_processes_is_one_clear_error():
    check_batch(4, World(0, 2))
    check_batch(3, World())
    with pytest.raises(UserError, match=r"train.batch_size=3 .* 2 processes .* --num_processes 1 or 3"):
        check_batch(3, World(1, 2))
    with pytest.raises(UserError, match=r"per-process batch of 0.*train.batch_size to a multiple of 4"):
        check_batch(2, World(0, 4))
    with pytest.raises(UserError, match="A checkpoint resumes on any number of processes that divides"):
        check_batch(6, World(0, 4), resuming=True)


WATCHDOG = textwrap.dedent("""
    import sys, time
    from datetime import timedelta
    import torch.distributed as dist
    from qlora_trainer.distributed import World
    from qlora_trainer.errors import UserError
    dist.init_process_group("gloo", timeout=timedelta(seconds=2))
    world = World.from_env(timeout_s=2)
    if world.rank == 1:
        time.sleep(15)  # a rank that never joins the collective
        sys.exit(0)
    try:
        world.sum([1.0], "counting the step's trained tokens")
    except UserError as err:
        print("USER ERROR:", err, flush=True)
        sys.exit(3)
""")


@pytest.mark.slow
def test_a_collective_that_waits_past_the_timeout_is_an_error_naming_the_rank(tmp_path):
    script = tmp_path / "watchdog.py"
    script.write_text(WATCHDOG)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert re.search(r"USER ERROR: rank 0 of 2: counting the step's trained tokens: the other processes did not "
                     r"answer within train.ddp_timeout=2s", proc.stdout), proc.stdout + proc.stderr
    assert time.monotonic() - start < 60


# ------------------------------------------------------------------------------------------ DDP

@pytest.mark.slow
def test_ddp_two_processes_train_the_one_process_model_and_only_the_main_process_writes(one_process, tmp_path):
    config, reference = one_process
    out = tmp_path / "ddp"
    code, output = launch(config, out, audit=tmp_path / "audit")
    assert code == 0, output
    ours, theirs = losses(out), losses(reference)
    assert ours.keys() == theirs.keys() == set(range(1, STEPS + 1))
    assert max(abs(ours[s] - theirs[s]) for s in ours) < 1e-5  # metrics.jsonl rounds to 1e-6
    assert same_evals(out, reference)
    assert adapter_diff(out / "adapter", reference / "adapter") < 1e-5
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000005"]
    state = json.loads((out / "checkpoints" / "step-000005" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == STEPS  # one row a step, not one a rank
    assert output.count(f"done: {STEPS} steps") == 1  # the main process speaks for the run
    writes = {"rank0": [], "rank1": []}
    for log in (tmp_path / "audit").glob("rank*.txt"):
        writes[log.name.split("-")[0]] += log.read_text().splitlines()
    assert writes["rank1"] == []  # rank 1 never touched OUT
    written = {line.split(" ", 1)[1] for line in writes["rank0"]}
    assert str(out.resolve() / ".lock") in written and str(out.resolve() / "config.yaml") in written
    # the two processes' step-2 checkpoint, resumed on one process, goes on with the same model
    for step in (4, 5):
        shutil.rmtree(out / "checkpoints" / f"step-{step:06d}")
    assert cli.main(["train", str(config), f"out={out}", "--resume"]) == 0
    assert adapter_diff(out / "adapter", reference / "adapter") < 1e-5


@pytest.mark.slow
def test_a_one_process_checkpoint_resumed_on_two_goes_on_with_the_same_model(one_process, tmp_path):
    config, reference = one_process
    out = tmp_path / "one-then-two"
    shutil.copytree(reference, out)
    for step in (4, 5):
        shutil.rmtree(out / "checkpoints" / f"step-{step:06d}")
    code, output = launch(config, out, "--resume")
    assert code == 0, output
    assert "resumed from" in output and "step 2" in output
    assert "the checkpoint was written by 1 process(es), this run has 2" in output
    assert adapter_diff(out / "adapter", reference / "adapter") < 1e-5
    assert max(abs(a - b) for a, b in zip(losses(out).values(), losses(reference).values())) < 1e-5


# ------------------------------------------------------------------------------------------ FSDP-QLoRA

@pytest.mark.slow
def test_fsdp_shards_the_nf4_base_and_trains_the_one_process_model(one_process, tmp_path):
    config, reference = one_process
    out = tmp_path / "fsdp"
    code, output = launch(config, out, kind="fsdp")
    assert code == 0, output
    shares = [float(x) for x in re.findall(r"rank \d holds ([\d.]+)%", output)]
    assert len(shares) == 2 and all(abs(s - 50.0) < 1.0 for s in shares), output
    ours, theirs = losses(out), losses(reference)
    assert max(abs(ours[s] - theirs[s]) for s in ours) < 1e-5
    assert same_evals(out, reference)
    assert adapter_diff(out / "adapter", reference / "adapter") < 1e-5
    # the adapter the sharded run saved is an ordinary PEFT adapter: PEFT over transformers' NF4 = ours
    peft_model = PeftModel.from_pretrained(transformers_nf4(ASSET), out / "adapter").eval()
    mine = load_ours(ASSET)
    load_adapter_into(mine, out / "adapter")
    ids = random_ids(mine.config.vocab_size, seed=3)
    torch.testing.assert_close(logits_of(mine, ids), logits_of(peft_model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])  # adamw: the test above
def test_fsdp_saves_checkpoints_with_the_8bit_optimizers(tmp_path, optimizer):
    """PEFT documents that paged_adamw_8bit fails to save under FSDP-QLoRA: ours keeps the trained weights out of
    the sharding, so each optimizer saves as on one process."""
    config = workspace(tmp_path, train={"optimizer": optimizer, "epochs": None, "max_steps": 2,
                                                   "save_every": 1})
    out = tmp_path / "out"
    code, output = launch(config, out, kind="fsdp")
    assert code == 0, output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    state = torch.load(out / "checkpoints" / "step-000002" / "optimizer.pt", weights_only=True)
    assert len(state["state"]) == len(load_file(out / "adapter" / "adapter_model.safetensors"))


# ------------------------------------------------------------------------------------------ crash safety

def _rank_pids(proc: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the training processes a launch started."""
    import psutil

    found = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            env = child.environ()
        except psutil.Error:
            continue
        if "RANK" in env and "qlora_trainer" in " ".join(child.cmdline()):
            found[int(env["RANK"])] = child.pid
    return found


@pytest.mark.slow
def test_sigkill_of_one_rank_ends_the_run_and_resume_gives_the_uninterrupted_adapter(tmp_path):
    # dropout on: every rank's random stream must come back from the checkpoint too
    config = workspace(tmp_path, lora={"dropout": 0.1}, train={"epochs": None, "max_steps": 8,
                                                                      "save_every": 2})
    out = tmp_path / "killed"
    run = launch(config, out, wait=False)
    while not (out / "checkpoints" / "step-000002").is_dir() and run.poll() is None:
        time.sleep(0.02)
    pids = _rank_pids(run)
    assert sorted(pids) == [0, 1], pids
    for pid in pids.values():  # frozen mid-run (holding the lock) while a second launch tries the same OUT
        os.kill(pid, signal.SIGSTOP)
    holder = (out / ".lock").read_text()
    second = launch(config, out, "--resume", wait=False)
    refusal = ""
    for line in second.stdout:  # its rank 0 refuses before loading anything
        refusal += line
        if "another training run" in line:
            break
    # its rank 1 waits in the process group's start-up for a rank 0 that has gone, writing nothing, until the
    # launcher stops it (after torchrun's 30 s grace): no need to wait for that here
    os.killpg(second.pid, signal.SIGKILL)
    second.wait()
    assert "another training run" in refusal and str(pids[0]) in refusal, refusal
    assert (out / ".lock").read_text() == holder
    os.kill(pids[1], signal.SIGKILL)
    os.kill(pids[0], signal.SIGCONT)
    output, _ = run.communicate(timeout=120)
    assert "error: rank 0 of 2:" in output and "resume with --resume" in output, output
    assert run.returncode != 0
    assert losses_so_far(out) < 8 and not (out / "adapter").exists(), output
    code, output = launch(config, out, "--resume")
    assert code == 0, output
    assert "resumed from" in output
    reference = tmp_path / "reference"
    code, output = launch(config, reference)
    assert code == 0, output
    assert bitwise_equal(out / "adapter", reference / "adapter")


def losses_so_far(out: Path) -> int:
    try:
        return len(losses(out))
    except (OSError, json.JSONDecodeError):
        return 0


def test_pruning_keeps_a_live_writers_temp_folder_and_removes_a_dead_ones(tmp_path):
    from qlora_trainer import checkpoint as ckpt

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ended = subprocess.Popen(["true"])
    ended.wait()
    try:
        (folder / f".tmp-step-000004-ab12cd34-{live.pid}").mkdir()  # another process is writing this one now
        (folder / f".tmp-step-000002-ef56ab78-{ended.pid}").mkdir()  # left by a process that has ended
        ckpt._prune(folder, keep=1)
        assert [p.name for p in folder.iterdir()] == [f".tmp-step-000004-ab12cd34-{live.pid}"]
    finally:
        live.kill()
        live.wait()


def test_the_readme_shows_the_launch_commands_of_the_shipped_accelerate_configs():
    readme = (REPO / "README.md").read_text()
    for kind in ("ddp", "fsdp"):
        assert (f"accelerate launch --config_file configs/accelerate/{kind}.yaml --num_processes 2 -m qlora_trainer "
                f"train configs/tiny.yaml") in readme
        assert (REPO / "configs" / "accelerate" / f"{kind}.yaml").is_file()


def test_compute_dtype_storage_keeps_every_nf4_bit_and_the_logits(tiny_llama, one_thread):
    """FSDP-QLoRA's quant_storage: the packed bytes relabelled as float32, not changed."""
    from qlora_trainer import quant

    model = load_ours(tiny_llama)
    ids = random_ids(model.config.vocab_size, seed=5)
    layers = {name: m for name, m in model.named_modules() if quant.is_nf4_linear(m)}
    raw = {name: m.weight.data.clone() for name, m in layers.items()}
    weights = {name: quant.dequantize(m) for name, m in layers.items()}
    before = logits_of(model, ids)
    assert quant.store_as(model, torch.float32) == len(layers)
    for name, module in layers.items():
        assert module.weight.dtype == torch.float32 and module.weight.quant_storage == torch.float32
        assert torch.equal(module.weight.data.reshape(-1).view(torch.uint8), raw[name].reshape(-1))
        assert torch.equal(quant.dequantize(module), weights[name])
    assert torch.equal(logits_of(model, ids), before)

"""Config: YAML + dotted overrides with types, every rejection (unknown key with a suggestion, wrong type,
impossible value, missing key, malformed YAML, bad override), the save/load round trip, configs/*.yaml, and where
relative paths resolve (the file's folder; the current folder for overrides; a cached hub id stays as given)."""

import shutil

import pytest
import yaml

from qlora_trainer.cli import main
from qlora_trainer.config import RunConfig, build_config, load_config, save_config
from qlora_trainer.errors import UserError
from tests.helpers import REPO
MINIMAL = "model:\n  path: /models/m\ndata:\n  path: data/train.jsonl\nout: runs/x\n"


@pytest.fixture
def cfg_file(tmp_path):
    def write(text=MINIMAL, name="cfg.yaml"):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return str(path)
    return write


def error(path, overrides=()):
    with pytest.raises(UserError) as err:
        load_config(path, list(overrides))
    return str(err.value)


def test_defaults_match_the_design(cfg_file, tmp_path):
    cfg = load_config(cfg_file(), [])
    assert (cfg.model.path, cfg.model.compute_dtype, cfg.model.task) == ("/models/m", "auto", "causal_lm")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets) == (16, 32.0, 0.05, "all-linear")
    assert (cfg.data.format, cfg.data.max_seq_len, cfg.data.packing, cfg.data.eval_fraction) == ("alpaca", 2048,
                                                                                                 False, 0.05)
    t = cfg.train
    assert (t.max_steps, t.batch_size, t.grad_accum, t.lr, t.warmup_steps, t.schedule, t.optimizer) == (
        1000, 1, 16, 2e-4, 10, "cosine", "paged_adamw_8bit")
    assert (t.save_every, t.eval_every, t.log_every, t.seed, t.max_grad_norm) == (100, 100, 10, 0, 0.3)
    assert cfg.out == str(tmp_path / "runs" / "x") and cfg.resume is False  # relative: against the file's folder


def test_report_to_defaults_to_none_and_takes_a_name_or_a_list(cfg_file):
    assert load_config(cfg_file(), []).train.report_to == "none"
    assert load_config(cfg_file(), []).train.trackers == []
    assert load_config(cfg_file(), ["train.report_to=tensorboard"]).train.trackers == ["tensorboard"]
    cfg = load_config(cfg_file(), ["train.report_to=[tensorboard, wandb, mlflow]"])
    assert cfg.train.trackers == ["tensorboard", "wandb", "mlflow"]
    assert "drop none" in error(cfg_file(), ["train.report_to=[none, wandb]"])


def test_attn_implementation_defaults_to_auto_and_takes_each_choice(cfg_file):
    assert load_config(cfg_file(), []).model.attn_implementation == "auto"
    for choice in ("sdpa", "eager", "flash_attention_2"):
        assert load_config(cfg_file(), [f"model.attn_implementation={choice}"]).model.attn_implementation == choice
    assert "model.attn_implementation must be a string, got 2" in error(cfg_file(), ["model.attn_implementation=2"])


def test_overrides_parse_with_yaml_rules_and_field_types(cfg_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(cfg_file(), ["lora.r=32", "data.packing=true", "lora.targets=[q_proj,v_proj]", "out=runs/y",
                                   "train.lr=3e-4", "lora.alpha=8", "data.eval_path=data/e.jsonl",
                                   "train.max_grad_norm=1", "resume=true", "data.eval_fraction=0"])
    assert cfg.lora.r == 32 and type(cfg.lora.r) is int
    assert cfg.data.packing is True
    assert cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.out == str(tmp_path / "runs" / "y") and cfg.resume is True  # overrides: against the current folder
    assert cfg.train.lr == 3e-4  # YAML reads 3e-4 (no dot) as a string; a float field accepts it
    assert cfg.lora.alpha == 8.0 and type(cfg.lora.alpha) is float
    assert cfg.train.max_grad_norm == 1.0 and type(cfg.train.max_grad_norm) is float
    assert cfg.data.eval_path == str(tmp_path / "data" / "e.jsonl") and cfg.data.eval_fraction == 0.0
    assert load_config(cfg_file(), ["data.eval_path=null"]).data.eval_path is None


def test_overrides_beat_the_file_and_can_fill_a_missing_section(cfg_file, tmp_path, monkeypatch):
    path = cfg_file("model: {path: a}\nlora: {r: 4}\nout: o\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path, ["lora.r=8", "data.path=d.jsonl", "model.path=b"])
    assert (cfg.lora.r, cfg.data.path, cfg.model.path) == (8, str(tmp_path / "d.jsonl"), str(tmp_path / "b"))


def test_round_trip_through_save_config(cfg_file, tmp_path):
    cfg = load_config(cfg_file(), ["lora.targets=[q_proj, k_proj]", "train.lr=1.5e-4", "data.eval_path=e.jsonl",
                                   "model.compute_dtype=bf16", "lora.use_rslora=true", "train.schedule=linear"])
    saved = str(tmp_path / "run" / "config.yaml")
    save_config(cfg, saved)
    again = load_config(saved, [])
    assert again == cfg and isinstance(again, RunConfig)
    assert not [p for p in (tmp_path / "run").iterdir() if p.name != "config.yaml"]  # no temp file left behind


@pytest.mark.parametrize("text, key, suggestion", [
    ("lora: {rank: 8}", "lora.rank", "lora.r"),
    ("lora: {lora_alpha: 8}", "lora.lora_alpha", "lora.alpha"),
    ("train: {learning_rate: 0.1}", "train.learning_rate", "train.lr"),
    ("train: {max_step: 5}", "train.max_step", "train.max_steps"),
    ("lr: 0.1", "lr", "train.lr"),
    ("lorra: {r: 8}", "lorra", "lora"),
    ("data: {pakcing: true}", "data.pakcing", "data.packing"),
])
def test_unknown_keys_suggest_the_closest_valid_key(cfg_file, text, key, suggestion):
    path = cfg_file(MINIMAL + text + "\n")
    assert error(path) == f"unknown key '{key}' in {path}: did you mean '{suggestion}'?"


def test_unknown_key_in_an_override(cfg_file):
    msg = error(cfg_file(), ["lora.rank=8"])
    assert "unknown key 'lora.rank'" in msg and "did you mean 'lora.r'?" in msg


@pytest.mark.parametrize("override, key, wanted", [
    ("lora.r=sixteen", "lora.r", "an integer"),
    ("lora.r=2.5", "lora.r", "an integer"),
    ("lora.r=true", "lora.r", "an integer"),
    ("train.lr=fast", "train.lr", "a number"),
    ("data.packing=3", "data.packing", "true or false"),
    ("data.path=[a, b]", "data.path", "a string"),
    ("lora.targets=[1, 2]", "lora.targets", "list of strings"),
    ("train.batch_size=", "train.batch_size", "an integer"),
])
def test_wrong_types_name_the_key_and_the_type(cfg_file, override, key, wanted):
    path = cfg_file()
    msg = error(path, [override])
    assert path in msg and f"{key} must be" in msg and wanted in msg


@pytest.mark.parametrize("override, key", [
    ("lora.r=0", "lora.r"), ("lora.r=-4", "lora.r"), ("train.lr=0", "train.lr"), ("train.lr=-1e-4", "train.lr"),
    ("lora.alpha=0", "lora.alpha"), ("lora.dropout=1", "lora.dropout"), ("lora.dropout=-0.1", "lora.dropout"),
    ("data.max_seq_len=7", "data.max_seq_len"), ("data.eval_fraction=1.0", "data.eval_fraction"),
    ("data.eval_fraction=-0.1", "data.eval_fraction"), ("train.batch_size=0", "train.batch_size"),
    ("train.grad_accum=0", "train.grad_accum"), ("train.max_steps=0", "train.max_steps"),
    ("train.warmup_steps=-1", "train.warmup_steps"), ("lora.targets=q_proj", "lora.targets"),
])
def test_impossible_values_are_rejected_with_the_fix(cfg_file, override, key):
    path = cfg_file()
    msg = error(path, [override])
    assert path in msg and f"{key} must be" in msg and f"{key}=" in msg  # names the file, the key, a value to set


def test_impossible_value_in_the_file(cfg_file):
    path = cfg_file(MINIMAL + "lora: {r: 0}\n")
    assert error(path) == f"{path}: lora.r must be a positive integer, got 0: set e.g. lora.r=16"


@pytest.mark.parametrize("override, key, valid", [
    ("train.schedule=exp", "train.schedule", "cosine, linear, constant"),
    ("train.optimizer=sgd", "train.optimizer", "adamw, adamw_8bit, paged_adamw_8bit"),
    ("data.format=sharegpt", "data.format", "text, alpaca, completion, chat, classification"),
    ("model.compute_dtype=bf32", "model.compute_dtype", "auto, bf16, fp16, fp32"),
    ("model.task=seq2seq", "model.task", "causal_lm, classification"),
    ("model.attn_implementation=flash", "model.attn_implementation", "auto, sdpa, eager, flash_attention_2"),
    ("train.report_to=comet", "train.report_to", "none, tensorboard, wandb, mlflow"),
    ("train.report_to=[tensorboard, aim]", "train.report_to", "none, tensorboard, wandb, mlflow"),
])
def test_unknown_enum_values_list_the_valid_ones(cfg_file, override, key, valid):
    assert f"{key} must be one of {valid}" in error(cfg_file(), [override])


@pytest.mark.parametrize("text, key", [
    ("data: {path: d}\nout: o\n", "model.path"),
    ("model: {path: m}\nout: o\n", "data.path"),
    ("model: {path: m}\ndata: {path: d}\n", "out"),
    ("model: {compute_dtype: bf16}\ndata: {path: d}\nout: o\n", "model.path"),
])
def test_missing_required_keys(cfg_file, text, key):
    path = cfg_file(text)
    msg = error(path)
    assert path in msg and f"missing required key '{key}'" in msg


def test_malformed_yaml_names_file_and_line(cfg_file):
    path = cfg_file("model:\n  path: m\nlora: {r: 8\ndata:\n  path: d\n")
    msg = error(path)
    assert msg.startswith(f"{path} line ") and "invalid YAML" in msg
    path = cfg_file("model:\n  path: m\n   bad: indent\n")
    assert error(path).startswith(f"{path} line 3: invalid YAML")


def test_other_bad_input(cfg_file, tmp_path):
    assert "has no '='" in error(cfg_file(), ["lora.r"])
    assert "not found" in error(str(tmp_path / "missing.yaml"))
    assert "top level must be a mapping" in error(cfg_file("- a\n- b\n"))
    assert "'lora' in" in error(cfg_file(MINIMAL + "lora: 16\n"))
    assert "model.task classification needs data.format classification" in error(
        cfg_file(), ["model.task=classification"])


def test_every_shipped_config_loads_and_validates():
    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert {p.name for p in paths} >= {"tiny.yaml", "llama2-7b.yaml", "llama3-8b.yaml",
                                                    "llama2-13b.yaml", "llama3-70b.yaml"}
    for path in paths:
        cfg = load_config(str(path), [])
        assert cfg.out and cfg.model.path and cfg.data.path


@pytest.mark.parametrize("name, lr, dropout", [("llama2-7b", 2e-4, 0.1), ("llama3-8b", 2e-4, 0.1),
                                               ("llama2-13b", 2e-4, 0.1), ("llama3-70b", 1e-4, 0.05)])
def test_real_configs_use_the_qlora_paper_hyperparameters(name, lr, dropout):
    cfg = load_config(str(REPO / "configs" / f"{name}.yaml"), [])
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets) == (64, 16.0, dropout, "all-linear")
    assert (cfg.train.lr, cfg.train.optimizer, cfg.train.schedule, cfg.train.max_grad_norm) == (
        lr, "paged_adamw_8bit", "constant", 0.3)
    assert cfg.model.compute_dtype == "bf16" and cfg.train.batch_size * cfg.train.grad_accum == 16


def test_tiny_config_is_the_cpu_demo():
    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), [])
    assert (cfg.model.path, cfg.model.compute_dtype, cfg.data.format, cfg.train.optimizer) == (
        str(REPO / "assets" / "tiny-llama"), "fp32", "chat", "adamw")
    assert (cfg.data.path, cfg.data.eval_path, cfg.out) == (
        str(REPO / "data/demo/train.jsonl"), str(REPO / "data/demo/eval.jsonl"), str(REPO / "runs" / "tiny"))


# ------------------------------------------------------------------------------------ where paths resolve

def _project(tmp_path):
    """tmp/proj/configs/run.yaml naming ../models/m, ../data/*.jsonl and ../runs/x; the current folder elsewhere."""
    proj = tmp_path / "proj"
    (proj / "configs").mkdir(parents=True)
    (proj / "models" / "m").mkdir(parents=True)
    config = proj / "configs" / "run.yaml"
    config.write_text("model: {path: ../models/m}\n"
                      "data: {path: ../data/train.jsonl, eval_path: ../data/eval.jsonl}\nout: ../runs/x\n")
    return proj, config


def test_relative_paths_in_the_file_resolve_against_its_folder(tmp_path, monkeypatch):
    proj, config = _project(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config(str(config))
    assert (cfg.model.path, cfg.data.path, cfg.data.eval_path, cfg.out) == (
        str(proj / "models" / "m"), str(proj / "data" / "train.jsonl"), str(proj / "data" / "eval.jsonl"),
        str(proj / "runs" / "x"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load_config(str(config), ["out=~/runs/y"]).out == str(tmp_path / "home" / "runs" / "y")


def test_overrides_resolve_against_the_current_folder(tmp_path, monkeypatch):
    proj, config = _project(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = load_config(str(config), ["out=runs/y", "data.path=my.jsonl", "model={path: ../m}", "data.eval_path=null"])
    assert (cfg.model.path, cfg.data.path, cfg.data.eval_path, cfg.out) == (
        str(tmp_path / "m"), str(work / "my.jsonl"), None, str(work / "runs" / "y"))


def test_a_hub_id_stays_unless_a_path_of_that_name_is_there(tmp_path, monkeypatch):
    config = tmp_path / "configs" / "run.yaml"
    config.parent.mkdir()
    config.write_text("model: {path: org/name}\ndata: {path: org/dataset, eval_path: data/eval.jsonl}\nout: runs/x\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(config), ["data.eval_path=org/evalset"])
    assert (cfg.model.path, cfg.data.path, cfg.data.eval_path) == ("org/name", "org/dataset", "org/evalset")
    # a data file name (with an extension) is a file, never a dataset id; ./org/name is a path
    cfg = load_config(str(config), ["model.path=./org/name"])
    assert cfg.data.eval_path == str(config.parent / "data" / "eval.jsonl")
    assert cfg.model.path == str(tmp_path / "org" / "name")
    (config.parent / "org" / "name").mkdir(parents=True)  # now the file's folder holds a folder of that name
    assert load_config(str(config)).model.path == str(config.parent / "org" / "name")


def test_saved_config_has_absolute_paths_and_repeats_the_run_from_anywhere(tmp_path, monkeypatch):
    proj, config = _project(tmp_path)
    monkeypatch.chdir(proj)
    cfg = load_config(str(config), ["data.eval_path=other/eval.jsonl", "model.path=org/name"])
    save_config(cfg, proj / "runs" / "x" / "config.yaml")
    saved = yaml.safe_load((proj / "runs" / "x" / "config.yaml").read_text())
    assert (saved["model"]["path"], saved["data"]["path"], saved["data"]["eval_path"], saved["out"]) == (
        "org/name", str(proj / "data" / "train.jsonl"), str(proj / "other" / "eval.jsonl"), str(proj / "runs" / "x"))
    monkeypatch.chdir(tmp_path)
    assert load_config(str(proj / "runs" / "x" / "config.yaml")) == cfg
    # a config built in Python with relative paths (relative to the current folder) is saved absolute too
    built = build_config({"model.path": "m", "data.path": "d.jsonl", "out": "o"})
    save_config(built, tmp_path / "built.yaml")
    assert yaml.safe_load((tmp_path / "built.yaml").read_text())["out"] == str(tmp_path / "o")


def test_shipped_config_runs_from_another_folder(tmp_path, monkeypatch, capsys):
    """`cd /tmp && qlora-trainer data /abs/configs/tiny-sentiment.yaml`: the bundled model and data are found."""
    monkeypatch.chdir(tmp_path)
    assert main(["data", str(REPO / "configs" / "tiny-sentiment.yaml")]) == 0
    out = capsys.readouterr().out
    assert f"data: {REPO / 'data' / 'sentiment' / 'train.jsonl'} (format classification" in out
    assert "labels: 0=negative, 1=neutral, 2=positive" in out


def _fake_hub_cache(root, repo_id, files_from):
    """A Hugging Face hub cache holding `repo_id` at one snapshot (files copied from the folder `files_from`)."""
    org, name = repo_id.split("/")
    repo = root / f"models--{org}--{name}"
    snapshot = repo / "snapshots" / "abc123"
    shutil.copytree(files_from, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    return root


def test_model_path_org_name_loads_from_the_local_hub_cache(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    from qlora_trainer.loading import load_quantized

    cache = _fake_hub_cache(tmp_path / "hub", "org/tiny", REPO / "assets" / "tiny-llama")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    config = tmp_path / "run.yaml"
    config.write_text("model: {path: org/tiny, task: classification}\n"
                      f"data: {{path: {REPO / 'data' / 'sentiment' / 'eval.jsonl'}, format: classification}}\n"
                      "out: run\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(config))
    assert cfg.model.path == "org/tiny"
    assert main(["data", str(config)]) == 0  # the tokenizer comes from the cache
    assert "labels: 0=negative" in capsys.readouterr().out
    model = load_quantized(cfg.model.path, device="cpu", progress=False)
    assert model.config.num_hidden_layers == 4


def test_train_epochs_instead_of_max_steps(cfg_file, tmp_path):
    assert (load_config(cfg_file(), []).train.max_steps, load_config(cfg_file(), []).train.epochs) == (1000, None)
    cfg = load_config(cfg_file(), ["train.epochs=2"])
    assert (cfg.train.epochs, cfg.train.max_steps) == (2.0, None)  # the run derives the steps from the data
    assert load_config(cfg_file(), ["train.epochs=0.5"]).train.epochs == 0.5
    saved = str(tmp_path / "run" / "config.yaml")
    save_config(cfg, saved)
    assert load_config(saved, []) == cfg  # config.yaml reruns it as an epochs run
    for bad in ("0", "-1", ".nan", "abc"):
        msg = error(cfg_file(), [f"train.epochs={bad}"])
        assert "train.epochs must be" in msg, msg
    path = cfg_file(MINIMAL + "train: {max_steps: 300}\n")
    msg = error(path, ["train.epochs=3"])
    assert "train.max_steps (300) and train.epochs (3) are both set" in msg and "train.max_steps=null" in msg, msg
    assert load_config(path, ["train.epochs=3", "train.max_steps=null"]).train.epochs == 3.0

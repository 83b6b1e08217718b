"""The command line's parsing: flags and key=value overrides in any order, and help text as argparse renders it."""

from __future__ import annotations

import pytest

from qlora_trainer import cli
from qlora_trainer import train as train_mod
from tests.helpers import REPO

CONFIG = str(REPO / "configs" / "tiny-sentiment.yaml")


class Captured(Exception):
    """Raised by the stand-in for train(): the config the command built, without training."""


@pytest.fixture
def train_config(monkeypatch):
    def capture(cfg, **_):
        raise Captured(cfg)

    monkeypatch.setattr(train_mod, "train", capture)

    def run(argv):
        with pytest.raises(Captured) as caught:
            cli.main(argv)
        return caught.value.args[0]
    return run


@pytest.mark.parametrize("argv", [
    ["train", CONFIG, "--resume", "out=x", "lora.r=4"],  # flags before the overrides (failed before)
    ["train", CONFIG, "out=x", "lora.r=4", "--resume"],  # after
    ["train", CONFIG, "out=x", "--resume", "lora.r=4"],  # between
    ["train", "--resume", CONFIG, "out=x", "lora.r=4"],  # before the config
])
def test_train_takes_flags_and_overrides_in_any_order(train_config, tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    cfg = train_config(argv)
    assert (cfg.resume, cfg.out, cfg.lora.r) == (True, str(tmp_path / "x"), 4)


@pytest.mark.parametrize("order", ["flag first", "flag last"])
def test_train_dry_run_and_data_take_overrides_after_flags(tmp_path, capsys, order):
    rows = REPO / "data" / "sentiment" / "eval.jsonl"
    overrides = [f"data.path={rows}", "data.eval_fraction=0"]
    argv = ["train", CONFIG, "--dry-run", *overrides] if order == "flag first" else ["train", CONFIG, *overrides,
                                                                                     "--dry-run"]
    assert cli.main(argv) == 0
    assert f"data: {rows} (format classification" in capsys.readouterr().out
    assert cli.main(["data", CONFIG, *overrides]) == 0
    assert f"data: {rows} (format classification" in capsys.readouterr().out


def test_unknown_flags_and_a_missing_config_are_still_refused(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["train", CONFIG, "--resum-from", "x", "out=y"])
    assert err.value.code == 2 and "unrecognized arguments: --resum-from" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--resume"])
    assert "the following arguments are required: config\n" in capsys.readouterr().err  # not "config, overrides"


@pytest.mark.parametrize("command", [None, *cli.COMMANDS])
def test_help_renders_percent_signs_once(capsys, command):
    with pytest.raises(SystemExit) as err:
        cli.main(["--help"] if command is None else [command, "--help"])
    assert err.value.code == 0
    text = capsys.readouterr().out
    assert "%%" not in text and "%(" not in text
    if command == "inspect":
        flat = " ".join(text.split())
        assert "the ranks holding 90%/99% of the energy" in flat and "by the 90%-energy rank" in flat

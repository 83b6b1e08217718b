"""The command line: one module per command, each with HELP, add_arguments(parser) and run(args) -> int.

Every parser and every handler lives here; the library below never sees an argparse Namespace. Handlers turn flags
into keyword arguments and print results. A UserError becomes one clear line on stderr and exit code 2 (an
ArgumentError names the flag, e.g. --out, where the library names the argument, out). Command modules import
the library inside run(), so `--help` does not load torch.
"""

from __future__ import annotations

import argparse
import sys

from qlora_trainer.cli import classify, data, estimate, generate, inspect, merge, summary, train
from qlora_trainer.cli import eval as eval_command  # `eval` is a builtin: the module keeps the command's name
from qlora_trainer.errors import ArgumentError, UserError

COMMANDS = {"train": train, "data": data, "summary": summary, "merge": merge, "generate": generate,
            "inspect": inspect, "classify": classify, "estimate": estimate, "eval": eval_command}


class _CommandParser(argparse.ArgumentParser):
    """A command's parser. With `intermixed` (a command module's INTERMIXED = True) options and positionals may come
    in any order (`train CONFIG --resume out=x`): argparse's parse_known_intermixed_args, which the top-level parser
    cannot use itself because it has subcommands, runs when the top-level parser hands the command its arguments."""

    intermixed = False
    _parsing = False

    def parse_known_args(self, args=None, namespace=None):
        if not self.intermixed or self._parsing:  # parse_known_intermixed_args calls back here (Python < 3.12)
            return super().parse_known_args(args, namespace)
        self._parsing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-trainer", description="QLoRA fine-tuning on one GPU.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.HELP, description=getattr(command, "DESCRIPTION", None))
        p.intermixed = getattr(command, "INTERMIXED", False)
        command.add_arguments(p)
        p.set_defaults(run=command.run, flags=getattr(command, "FLAGS", {}))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UserError as err:
        if args.debug:
            raise
        text = err.as_flag(args.flags) if isinstance(err, ArgumentError) else str(err)
        # One line, whatever a library put into the text we quote (transformers' messages span several).
        print("error: " + " ".join(line.strip() for line in text.splitlines() if line.strip()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

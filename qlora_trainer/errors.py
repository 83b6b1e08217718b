"""The one exception type a user should ever see: it carries a message that names the file/key and the fix.

The rule: bad input from a user (a file, a config key, a flag, an adapter) raises UserError, which the CLI prints
as one line with exit code 2. A programming mistake in calling the library (a model without LoRA layers passed
to save_adapter, a wrong keyword value) raises ValueError/TypeError and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user (file, config key, adapter, ...). The CLI prints it as one line, exit code 2."""


class ArgumentError(UserError):
    """A bad value for one argument of a public function. The message names the argument as `{arg}`: it reads
    `out` from Python and `--out` on the command line, where cli/ fills in the flag (see as_flag)."""

    def __init__(self, argument: str, message: str):
        self.argument, self.template = argument, message
        super().__init__(message.format(arg=argument))

    def as_flag(self, flags: dict[str, str] | None = None) -> str:
        """The message with the argument named as its command-line flag: flags[argument] where a command spells
        it otherwise, else the usual spelling (max_shard_size -> --max-shard-size)."""
        flag = (flags or {}).get(self.argument) or "--" + self.argument.replace("_", "-")
        return self.template.format(arg=flag)

"""The one exception type a user should ever see: it carries a message that names the file/key and the fix."""


class UserError(Exception):
    """Bad input from the user (file, config key, adapter, ...). The CLI prints it as one line, exit code 2."""

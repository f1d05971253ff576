"""The one exception type whose message is shown to users as a single line."""


class MoechatError(Exception):
    """A user-facing error: the CLI prints ``str(err)`` on one line and exits non-zero."""

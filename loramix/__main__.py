"""``python -m loramix``: the `loramix` command."""

from loramix.cli import entry

entry()

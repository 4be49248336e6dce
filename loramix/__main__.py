"""``python -m loramix``: the `loramix` command."""

from loramix.cli import main

main()

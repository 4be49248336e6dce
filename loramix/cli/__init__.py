"""The `loramix` command: one module per command, each parsing flags or a recipe into a plan, calling the API
(`loramix.run` and friends) and printing one line; `options` holds what they share.

No maths and no files here. Each command imports what it needs when it runs, so ``loramix --help`` and
``loramix methods`` start without importing torch. The CLI alone changes process-wide state: the ``loramix``
logger's handler and level, and torch's CPU threads for the length of a command.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from loramix.cli.align import align
from loramix.cli.analyze import analyze
from loramix.cli.check import check
from loramix.cli.combine import combine
from loramix.cli.convert import convert
from loramix.cli.extract import extract
from loramix.cli.inspect import inspect
from loramix.cli.listing import examples, methods
from loramix.cli.options import Group, verbosity_options
from loramix.cli.push import push
from loramix.cli.run import run
from loramix.cli.search import search


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]}, params=verbosity_options())
@click.version_option(package_name="loramix")
def main() -> None:
    """Load, analyse and combine LoRA adapters."""


for command in (align, analyze, check, combine, convert, examples, extract, inspect, methods, push, run, search):
    main.add_command(command)


def entry() -> None:
    """The `loramix` command as a process (the console script and ``python -m loramix``): `main`, then out without
    the interpreter's teardown, which after torch is imported takes about half a second of freeing modules one by
    one (CUDA's too) while every file is already written and closed. Output and log handlers are flushed first;
    an unexpected exception (a bug) still ends the normal way, with its traceback."""
    try:
        main()
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # as Python does for sys.exit("message")
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`loramix ... | head`), a closed stream
            pass
    os._exit(code or 0)

"""What every `loramix` command shares: one-line errors (hints spelled as flags), the verbosity options accepted
before and after a command, the group whose usage errors are one line, and the option groups and parsers several
commands take. Imports only click and `loramix.errors`, so ``--help`` stays torch-free."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import logging
import re
import signal
import sys
import threading
import warnings
from pathlib import Path

import click

from loramix import settings
from loramix.errors import LoramixError, shown


@contextlib.contextmanager
def start_up():
    """Around a command's first heavy imports (torch's alone make about a million objects): no garbage collection
    while they run, which would walk the growing heap again and again (0.1–0.2 s of a merge's start-up), and what
    they made frozen out of later collections for the rest of the command (`gc.freeze`; `Group.main` unfreezes
    them after it). The collector is left on or off as it was."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def start_gpu_driver(device: str | None) -> None:
    """For a command that will work on a GPU (``device`` None or ``auto``, ``cuda``, ``cuda:N``): bring up the CUDA
    driver and the device's primary context on a background thread through the driver's own library, while torch
    is still importing (these calls do not hold Python's lock); torch later finds both made and uses them. On an
    H100 host torch's first CUDA tensor after its import then took 0.02 s instead of 0.30–0.40 s. No driver, no
    such device, or a device that is not a GPU: nothing. The context is kept for the process (the CLI's own)."""
    device = str(device or "auto")
    index = device.partition(":")[2]
    if not device.startswith(("cuda", "auto")) or not (index or "0").isdigit():
        return

    def start() -> None:
        with contextlib.suppress(OSError, AttributeError):
            driver = ctypes.CDLL("libcuda.so.1")
            handle, context = ctypes.c_int(), ctypes.c_void_p()
            if driver.cuInit(0) == 0 and driver.cuDeviceGet(ctypes.byref(handle), int(index or 0)) == 0:
                driver.cuDevicePrimaryCtxRetain(ctypes.byref(context), handle)

    threading.Thread(target=start, daemon=True, name="loramix-cuda-driver").start()


class RegisteredChoice(click.Choice):
    """A choice read from a registry each time it is asked (output formats a module may add after import)."""

    def __init__(self, names) -> None:
        self.names = names
        super().__init__((), case_sensitive=True)

    @property
    def choices(self) -> tuple[str, ...]:
        return self.names()

    @choices.setter
    def choices(self, value) -> None:  # click.Choice.__init__ sets it; the registry holds them
        pass


def choice(hint) -> click.Choice:
    """The click type of a closed setting (`loramix.settings`): its `Literal`'s values, or a registry's names."""
    oneof = next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, settings.OneOf)), None)
    return RegisteredChoice(oneof.names) if oneof else click.Choice(settings.choices(hint))


class OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {shown(as_flags(record.getMessage()))}"


SHARD_SIZE_HELP = (
    "With --merge-into: lay the tensors out anew in shards of at most this size [default: the base's own shard "
    "files; 5GB for a .bin base]."
)
# One default for every command: where there is a GPU, combining, merging and searching all run faster on it (a
# search is forward passes through the whole base); results agree with the CPU's to float32 rounding.
DEVICE_HELP = "cpu, cuda, cuda:N, or auto: a GPU when there is one, else the CPU [default: auto]."

# Python option names whose command-line flag is not simply --name-with-dashes.
_FLAGS = {"overwrite": "--force", "merge_into": "--merge-into BASE"}
# An option named in a message, as the API spells it: `rank`, `rank_layout='exact'` (see `loramix.errors`).
_NAMED = re.compile(r"`([a-z][a-z0-9_]*)(?:=('?)([^`']*)\2)?`")


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def as_flags(text: str) -> str:
    """``text`` with the options it names in backticks spelled as the command line's flags: `merge_into` →
    --merge-into BASE, `overwrite` → --force, `rank_layout='exact'` → --rank-layout exact. Other backticked text
    (a command, a file) is kept."""
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root().command if ctx else None
    commands = [root, *getattr(root, "commands", {}).values()] if root else []
    known = set(_FLAGS) | {p.name for c in commands for p in c.params if isinstance(p, click.Option)}

    def spelled(match: re.Match) -> str:
        name, value = match.group(1), match.group(3)
        if name not in known:
            return match.group(0)
        flag = _flag(name)
        return flag if value is None else f"{flag.split()[0]} {value}"

    return _NAMED.sub(spelled, text)


def error_line(exc: LoramixError) -> str:
    """The one line the CLI prints for an expected failure, options spelled as flags, control characters shown."""
    return f"error: {shown(as_flags(exc.hint(_flag(exc.option or ''))))}"


def errors_as_one_line(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LoramixError as exc:
            click.echo(error_line(exc), err=True)
            sys.exit(2)

    return wrapper


def option_group(*options):
    """Several click options as one decorator, listed in --help in the order given."""

    def apply(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


# --rank/--energy/--rule/--rule-value: one `RankRule` for combine (truncation) and analyze (suggestions).
rank_rule_options = option_group(
    click.option("--rank", type=click.IntRange(min=1), help="At most this rank per module."),
    click.option("--energy", type=click.FloatRange(0, 1, min_open=True), help="Smallest rank keeping this Σσ² share."),
    click.option("--rule", type=choice(settings.KohyaRule), help="Kohya's rank rule."),
    click.option(
        "--rule-value",
        type=float,
        metavar="V",
        help="With --rule: sv_ratio keeps σᵢ > σ₁/V (V > 0, e.g. 10); sv_fro the smallest rank keeping V·‖ΔW‖_F "
        "(V in (0, 1]; energy V²); sv_cumulative the smallest k with σ₁+…+σₖ ≥ V·Σσ (V in (0, 1]).",
    ),
)


# What `extract` and `convert` share: a device to compute on and the one rank layout of the output adapter.
written_lora_options = option_group(
    click.option("--device", default="auto", help=DEVICE_HELP),
    click.option(
        "--rank-layout",
        type=choice(settings.RankLayout),
        default="portable",
        help="portable: one rank for every module (zero-padded), read right by every engine; exact: per-module ranks "
        "(PEFT only) [default: portable].",
    ),
)


def _verbosity(ctx: click.Context, param: click.Parameter, value) -> None:
    """-q/-v (given so far, before or after the subcommand): the ``loramix`` logger's handler and level, and bars."""
    state = ctx.find_root().ensure_object(dict)
    if value:
        state[param.name] = value
    if state.get("quiet") and state.get("verbose"):
        raise click.UsageError("give -q/--quiet or -v/--verbose, not both")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLine())
    root = logging.getLogger("loramix")
    root.handlers[:] = [handler]
    levels = {0: logging.WARNING, 1: logging.INFO}
    root.setLevel(logging.ERROR if state.get("quiet") else levels.get(state.get("verbose", 0), logging.DEBUG))
    root.propagate = False
    # Bars redraw a line with carriage returns: in a terminal only, never into a log file or a pipe.
    state["progress"] = not state.get("quiet") and sys.stderr.isatty()


def verbosity_options() -> list[click.Option]:
    """-q/-v, accepted before and after the subcommand: the group and each of its commands get a copy."""
    common = {"expose_value": False, "callback": _verbosity}
    return [
        click.Option(["-q", "--quiet"], is_flag=True, help="Hide warnings and progress bars.", **common),
        click.Option(["-v", "--verbose"], count=True, help="Say more (-v: notes, -vv: debugging details).", **common),
    ]


class _OtherLibraries(logging.Handler):
    """Other libraries' log records that reach the root logger (bitsandbytes' kernel notices, ...): the CLI's lines,
    through the logger that -q and -v set, instead of logging's bare last-resort output."""

    def emit(self, record: logging.LogRecord) -> None:
        origin = record.name.split(".")[0]
        logging.getLogger("loramix.cli").log(record.levelno, "%s (from %s)", record.getMessage().strip(), origin)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning as the CLI's one line (``warning: ...``), through the logger that -q and -v set."""
    origin = category.__module__ if category.__module__ != "builtins" else Path(filename).stem
    logging.getLogger("loramix.cli").warning("%s (%s from %s)", str(message).strip(), category.__name__, origin)


INTERRUPTED = 130  # the shell's status for a process ended by SIGINT (128 + 2)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (what timeout, kill, Docker and Slurm send) raises KeyboardInterrupt like SIGINT, so that an output
    being written is cleaned up (`loramix.io.files.atomic_output`) instead of the process dying mid-write."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _logger_restored():
    """The ``loramix`` logger as it was before the command (-q/-v set its handler, level and propagation for the
    command's length), so that a command run inside a Python process (CliRunner, a notebook) leaves it alone."""
    logger = logging.getLogger("loramix")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    try:
        yield
    finally:
        logger.handlers[:], logger.propagate = handlers, propagate
        logger.setLevel(level)


@contextlib.contextmanager
def _collector_restored():
    """Nothing frozen out of garbage collection after the command (`start_up` freezes its imports) when nothing was
    before it, so that a command run inside a Python process leaves the collector as it found it."""
    frozen = gc.get_freeze_count()
    try:
        yield
    finally:
        if not frozen:
            gc.unfreeze()


class Group(click.Group):
    """A group whose commands all take the verbosity options, and whose usage errors (unknown option, bad value) are
    one line on stderr, like every error."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        with _logger_restored(), _collector_restored():
            return self._main(*args, standalone_mode=standalone_mode, **kwargs)

    def _main(self, *args, standalone_mode: bool, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        others = _OtherLibraries(logging.WARNING)
        logging.getLogger().addHandler(others)  # for the length of the command, as the warnings below
        try:
            with warnings.catch_warnings(), _sigterm_as_interrupt():  # Python warnings as lines -q hides
                warnings.showwarning = _warning_line
                code = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as exc:
            if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):
                exc.show()  # a bare command: its help, as click prints it
            else:
                click.echo(f"error: {shown(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:  # click's form of KeyboardInterrupt (SIGINT, and SIGTERM here)
            click.echo("error: interrupted; no partial output is left behind", err=True)
            sys.exit(INTERRUPTED)
        finally:
            logging.getLogger().removeHandler(others)
        sys.exit(code if isinstance(code, int) else 0)

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.params += verbosity_options()
        super().add_command(cmd, name)


# --scale/--alpha/--base-model/--module-map: what a plain LoRA state dict file does not say, for every source (one
# source takes its own as SOURCE::scale=0.5,alpha=16,module_map=FILE,base_model=ID).
state_dict_options = option_group(
    click.option(
        "--scale", type=float, help="ΔW = scale·B·A for state dict LoRAs [default: 1]; one: SOURCE::scale=0.5."
    ),
    click.option("--alpha", type=float, help="Or their alpha (scale = alpha/rank per module)."),
    click.option(
        "--base-model",
        help="Base model of plain state dict LoRAs (a Hub id or path); with its config.json at hand, adapters are "
        "written under its in-memory module names.",
    ),
    click.option("--module-map", type=click.Path(exists=True, dir_okay=False), help="YAML/JSON regex → base name map."),
)


# How -w/--weights reads: one item per adapter, in YAML flow syntax, so that a number, a gradient and name filters
# all fit on one command line without ambiguity (the commas inside [..] and {..} belong to the item).
WEIGHTS_HELP = (
    "One weight per adapter, separated by commas [default: 1/n each]. Each is a number, a gradient across layers "
    "in brackets ('[0,1],0.5': 0 in the first layer to 1 in the last), name filters in braces with a final default "
    "('{self_attn: 1, default: 0.2},0.5': first match wins) or SD block weights ('{lbw: [...17 numbers], ratio: 1}')."
)


def weights(ctx, param, value: str | None) -> list | None:
    """-w/--weights (and --init): ``value`` read as the items of a YAML flow sequence, one per adapter."""
    if value is None:
        return None
    try:
        return [float(w) for w in value.split(",")]  # plain numbers, "1e-3" included (YAML 1.1 reads it as text)
    except ValueError:
        pass
    items = _flow_items(value, "weights")
    if not isinstance(items, list) or not items:
        raise click.BadParameter(f"expected weights separated by commas, got {value!r}")
    return items


def _flow_items(value: str, what: str):
    import yaml

    try:
        return yaml.safe_load(f"[{value}]")
    except (yaml.YAMLError, RecursionError) as exc:
        detail = str(exc).splitlines()[0] if isinstance(exc, yaml.YAMLError) else "nested too deeply"
        raise click.BadParameter(f"{what}: not a comma-separated YAML flow list ({detail}): {value!r}") from None


def block_weights(ctx, param, value: str | None) -> list | None:
    """--lbws: one list of SD block weights per adapter, in brackets, separated by commas."""
    if value is None:
        return None
    items = _flow_items(value, "lbws")
    if not items or not all(isinstance(item, list) for item in items):
        raise click.BadParameter(f"expected one [..] list per adapter, separated by commas, got {value!r}")
    return items


def method_options(ctx, param, values: tuple[str, ...]) -> dict:
    import yaml

    parsed = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}")
        try:
            parsed[key.replace("-", "_")] = yaml.safe_load(raw)
        except (yaml.YAMLError, RecursionError) as exc:
            detail = str(exc).splitlines()[0] if isinstance(exc, yaml.YAMLError) else "nested too deeply"
            raise click.BadParameter(f"{key}: not a valid YAML value ({detail})") from None
    return parsed


def bounds(ctx, param, value: str) -> tuple[float, float]:
    try:
        low, high = (float(b) for b in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected LOW,HIGH, got {value!r}") from None
    if not low < high:
        raise click.BadParameter(f"LOW must be below HIGH, got {value!r}")
    return low, high


def push_output(folder: str, repo_id: str | None) -> None:
    """--push-to-hub: upload a finished output folder."""
    if repo_id:
        from loramix.hub import push_to_hub

        click.echo(f"pushed {folder} to {repo_id}: {push_to_hub(folder, repo_id)}")

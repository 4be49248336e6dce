"""Every expected failure loramix raises. The CLI prints one as a single line on stderr and exits 2.

Messages speak Python: an error that a keyword option would avoid names it in ``option`` (and the value that avoids
it in ``value``), and its text ends "(pass allow_different_bases=True)". The CLI turns that hint into its flag
("(pass --allow-different-bases)"). An option named in the text (errors and logged warnings alike) is in backticks,
`rank` or `rank_layout='exact'`, which the CLI spells as its flag (--rank, --rank-layout exact); no message names a
flag itself. Where users expect a standard
exception, the class has it as a second base: a missing source is a ``FileNotFoundError``, a malformed file or
a bad option value a ``ValueError``, a wrong kind of object a ``TypeError``, an optional package that is
not installed (`MissingPackageError`, naming what to install) an ``ImportError``. Each class names a kind of mistake;
the kinds of a misused option (`SettingError`, `DeviceError`, `OutputFormatError`, `ArgumentError`) are
`MethodError` subclasses, the one class they all were before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata


def shown(text: str) -> str:
    """``text`` fit for one printed line: control characters (newline, ESC, NUL) and lone surrogates escaped."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii") for c in text
    )


def counted(count: int, noun: str) -> str:
    """``1 module``, ``4 modules``: a count with its noun (plural by an added "s")."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


class LoramixError(Exception):
    """Base class: an expected failure with a message a user can act on.

    ``option``/``value``: the keyword option (and its value) that would avoid this error, when there is one.
    """

    def __init__(self, message: str, *, option: str | None = None, value: object = True) -> None:
        super().__init__(message)
        self.message = message
        self.option = option
        self.value = value

    def __str__(self) -> str:
        return self.message + (f" (pass {self.option}={self.value!r})" if self.option else "")

    def hint(self, flag: str) -> str:
        """The message with its hint spelled as command-line ``flag`` (and the value, unless it is a switch)."""
        if not self.option:
            return self.message
        return self.message + f" (pass {flag}" + ("" if self.value is True else f" {self.value}") + ")"


class AdapterFormatError(LoramixError, ValueError):
    """A file or folder is not a readable adapter (missing, truncated, corrupt, mis-shaped, non-finite)."""


class ExpertLayoutError(AdapterFormatError):
    """A mixture-of-experts layout loramix does not recognise, or an operation that does not handle expert adapters
    yet: refused rather than read as a dense LoRA."""


class SourceError(LoramixError, FileNotFoundError):
    """A source (path or Hub id) cannot be resolved to a local file or folder."""


class IncompatibleAdaptersError(LoramixError, ValueError):
    """Adapters cannot be combined or converted as asked (different bases, shapes, ranks, heads, DoRA)."""


class MethodError(LoramixError, ValueError):
    """A merge method was misused: an unknown method, an option it does not take or a bad option value, or what it
    needs (data, a second adapter) missing. The kinds below are its subclasses, so ``except MethodError`` still
    catches every misuse of a call's options."""


class MethodDefinitionError(MethodError, TypeError):
    """A method registered with ``@method`` is defined wrongly (a name taken twice, no keyword-only ``rule``, an
    option without a default): a mistake in the code that defines it, not in a call."""


class SettingError(MethodError):
    """A setting of a run has a value loramix cannot use: a rank rule, weights, a schedule, a dtype, a shard size, a
    rank layout, a count of workers, or a setting that needs another one."""


class DeviceError(SettingError):
    """The device asked for is unknown, or not available on this machine."""


class OutputFormatError(SettingError):
    """An output format that does not exist, or one that does not fit what is written."""


class ArgumentError(MethodError, TypeError):
    """A Python call got the wrong kind of object (a model where an adapter was expected, a single source where a
    list was): a mistake in the calling code, not in a value."""


class MissingPackageError(LoramixError, ImportError):
    """An optional package a call needs (peft, bitsandbytes, gguf, matplotlib, accelerate) is not installed; the message
    says what to install (``pip install 'loramix[gguf]'``)."""


class OutputError(LoramixError):
    """An output location is unusable (exists, is not loramix's, or would overwrite an input)."""


class RecipeError(LoramixError, ValueError):
    """A recipe file is unreadable or invalid."""


class CheckpointError(LoramixError):
    """A base checkpoint is unreadable, or the adapter does not fit it (names, shapes, layers)."""


class HubError(LoramixError):
    """Pushing to the Hub failed (no token, no access, the Hub refused or could not be reached)."""


class SearchError(LoramixError):
    """A weight search cannot run as asked (examples, base model, tokenizer)."""


class BackendError(LoramixError):
    """An optional backend (bitsandbytes, gguf) failed inside its own code: its release or this machine's processor
    is one it does not run on. The message names the package, its version and what to do."""


@contextmanager
def inside_backend(package: str, doing: str) -> Iterator[None]:
    """Run a call into optional backend ``package`` (``doing``: what it was asked to do): an exception from inside
    it becomes one `BackendError` line naming the package and version, never a traceback. loramix's own errors and
    interrupts pass through unchanged."""
    try:
        yield
    except (LoramixError, MemoryError):
        raise
    except Exception as exc:
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            version = "(version unknown)"
        detail = shown(str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        raise BackendError(
            f"{package} {version} failed while {doing}: {type(exc).__name__}"
            + (f": {detail}" if detail else "")
            + f" (install the {package} release pinned in loramix's constraints.txt, the one it is tested with,"
            " or report this with the version above)"
        ) from exc

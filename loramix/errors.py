"""Expected failures. Every error a user can cause raises one of these; the CLI prints it as one line."""


class LoramixError(Exception):
    """Base class: an expected failure with a message a user can act on."""


class AdapterFormatError(LoramixError):
    """A file or folder is not a readable adapter (missing, truncated, corrupt, mis-shaped, non-finite)."""


class SourceError(LoramixError):
    """A source (path or Hub id) cannot be resolved to a local folder."""


class IncompatibleAdaptersError(LoramixError):
    """Adapters cannot be combined as asked (different bases, shapes, ranks, heads, DoRA)."""


class MethodError(LoramixError):
    """A merge method or its options were misused."""


class OutputError(LoramixError):
    """An output location is unusable (exists, or would overwrite an input)."""

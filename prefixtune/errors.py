"""The one error type the library raises for bad input, so the CLI can print it on one line."""


class PrefixTuneError(ValueError):
    """A user-facing error: bad input, a bad file, or an unsupported model.

    The message names the file, field or value at fault and says what to fix.
    """

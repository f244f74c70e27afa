"""The one exception type users see for bad input.

Every message is one sentence that names the problem and the fix. The CLIs print it
without a traceback.
"""


class DlmjaxError(ValueError):
    """Bad input or an unusable checkpoint; the message says what to do."""


class PromptTooLong(DlmjaxError):
    """A prompt that leaves no room for the requested generation (the server answers HTTP 413)."""

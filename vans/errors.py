"""User-facing errors. Each carries a one-line message that names the input and the fix."""


class VansError(Exception):
    """Base class: something the user can fix. The message is shown as is, without a traceback."""


class InputError(VansError, ValueError):
    """A bad video, question or setting."""


class ModelFileError(VansError):
    """A model file that is missing, of the wrong kind, incomplete, corrupt or unsafe."""


class Cancelled(VansError):
    """The user (or ComfyUI's Cancel button) stopped a long loop."""

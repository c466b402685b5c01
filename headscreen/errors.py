"""The project's exception hierarchy (dependency-free so every package can use it)."""


class HeadscreenError(Exception):
    """Base class of every error headscreen raises on purpose."""


class ConfigError(HeadscreenError):
    """The configuration is invalid; the message says which key and why."""


class InputRejected(HeadscreenError):
    """The input cannot be processed; recorded as a QC or ingest reason, never retried."""


class TransientError(HeadscreenError):
    """A temporary failure (peer down, database busy); retried by a policy."""


class BundleError(HeadscreenError):
    """A model bundle is malformed, of an unknown schema, or fails its hash check."""


# What pydicom and highdicom raise on a value they cannot decode or will not accept.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, TypeError, LookupError, AttributeError, ArithmeticError, EOFError, NotImplementedError,
)
_DECODING_PACKAGES = ("pydicom", "highdicom")


def is_input_error(exc: BaseException) -> bool:
    """True for an error of the input, not of the system: InputRejected, or a decode error
    raised while pydicom or highdicom handled a value (the traceback passes through them).
    Such an error fails the same way on every try, so it is never retried."""
    if isinstance(exc, InputRejected):
        return True
    if isinstance(exc, HeadscreenError) or not isinstance(exc, DECODE_ERRORS):
        return False
    tb = exc.__traceback__
    while tb is not None:
        parts = tb.tb_frame.f_code.co_filename.replace("\\", "/").split("/")
        if any(package in parts for package in _DECODING_PACKAGES) and (
                "site-packages" in parts or "dist-packages" in parts):
            return True
        tb = tb.tb_next
    return False

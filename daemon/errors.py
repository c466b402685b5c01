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

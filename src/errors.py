"""One root exception type for the product; retryable errors say so."""


class ProcessorError(Exception):
    """Root of every error this product raises on purpose."""


class SettingsError(ProcessorError):
    """A setting is missing or wrong; the message is one line naming the variable."""


class RetryableError(ProcessorError):
    """A transient fault (network, throttling, a server restarting): retrying may succeed."""


class SourceError(ProcessorError):
    """The source (local inbox or Drive) cannot be used as configured."""


class FileRejected(ProcessorError):
    """A source file cannot be read at all (not CSV, wrong header, not UTF-8)."""


class LakeError(ProcessorError):
    """The lake (local directory or S3 bucket) cannot be used as configured."""


class ObjectConflict(LakeError):
    """An object key already holds different content; it is never overwritten."""

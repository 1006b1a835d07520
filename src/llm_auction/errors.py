"""Errors a user can cause or fix, importable without the heavy libraries (the CLI catches these)."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint that could run arbitrary code when loaded (pickle) was refused."""


class PromptFormatError(ValueError):
    """A policy trained on another prompt template than this release writes (`policy.prompt`)."""


class JudgeError(RuntimeError):
    """The judge endpoint failed or replied with something that is not a valid judgment."""


class LaunchError(RuntimeError):
    """A distributed run that cannot start or that failed; the message says which and why."""


class RegistryError(ValueError):
    """A registry action that cannot be done (no such version, nothing to roll back to)."""


class InputError(ValueError):
    """The user's input cannot be used; the message names the field (or the file and line)."""


class UnknownEntityError(KeyError):
    """A request names a user, query or ad that the data at hand knows nothing about."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown entity"


class ServiceUnavailable(RuntimeError):
    """A dependency (the online feature store, the tracking server) cannot be reached now; retry later.

    Servers answer it with HTTP 503 and Retry-After; pipeline steps fail with the message.
    """

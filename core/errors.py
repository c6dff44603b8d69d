"""Exceptions that carry their own exit code, so every entry point maps failures the same way."""

EXIT_FAILED = 1
EXIT_USAGE = 2
# sysexits.h EX_TEMPFAIL: cron wrappers and systemd treat it as "try again later", not as a failure.
EXIT_LOCKED = 75


class DbdeckError(Exception):
    """A failure explained to the user in one message; no traceback unless --verbose."""

    exit_code = EXIT_FAILED


class ConfigError(DbdeckError):
    exit_code = EXIT_USAGE


class UsageError(DbdeckError):
    """The command line names something that does not exist (a job, an endpoint...)."""

    exit_code = EXIT_USAGE


class LockBusy(DbdeckError):
    exit_code = EXIT_LOCKED


class Refused(DbdeckError):
    """A safety check said no (production target, reversed direction, same database on both sides)."""


class CommandFailed(DbdeckError):
    """An external program failed. The message is already masked."""

    def __init__(self, message, *, argv=(), returncode=None, stderr=""):
        super().__init__(message)
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


class CommandTimeout(CommandFailed):
    pass


class Terminated(KeyboardInterrupt):
    """dbdeck was sent SIGTERM (systemd stop, timeout(1), kill): unwinds like Ctrl-C, so every
    cleanup (staging dropped, locks released) runs, and the command exits 143."""

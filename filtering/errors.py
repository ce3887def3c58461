"""Exceptions with one-line messages; the CLI maps them to exit codes (SPEC, "CLI")."""


class PoolsiftError(Exception):
    """Any failure poolsift reports as one line, exit code 1."""

    exit_code = 1


class ConfigError(PoolsiftError):
    """Bad config or usage: message names the key path and, where known, the valid choices. Exit 2."""

    exit_code = 2


class InputError(PoolsiftError):
    """Input paths that are missing or unreadable before any work starts. Exit 2."""

    exit_code = 2

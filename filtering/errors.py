"""Exceptions with one-line messages; the CLI maps them to exit codes (docs/spec.md, "CLI")."""


class PoolsiftError(Exception):
    """Any failure poolsift reports as one line, exit code 1."""

    exit_code = 1


class ConfigError(PoolsiftError):
    """Bad config or usage: message names the key path and, where known, the valid choices. Exit 2."""

    exit_code = 2


class InputError(PoolsiftError):
    """Input paths that are missing or unreadable before any work starts. Exit 2."""

    exit_code = 2


class FunnelError(PoolsiftError):
    """The run's counts break the manifest invariant ``input == kept + failed + sum(dropped)``:
    a sample was lost or counted twice. A bug in poolsift, never bad input. Exit 1."""

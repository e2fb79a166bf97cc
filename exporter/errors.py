"""Errors shared by the command-line modules (exporter/cli.py, exporter/runcli.py), kept apart so
neither imports the other for them."""

from __future__ import annotations


class CliError(Exception):
    """A one-line operator error: printed without a traceback, exit status 2."""

"""What every command module of the command line shares (kept out of cli.py, which
`python -m autoprune_ray.engine.cli` runs as __main__: a command module importing it would load a
second copy)."""
from __future__ import annotations

import functools

import click


def clear_errors(func):
    """Bad input ends in one clear line and a non-zero exit, not a traceback."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (ValueError, FileNotFoundError, FloatingPointError, OSError, KeyError) as exc:
            # str(KeyError(0)) is just "0": say what kind of error it is
            message = f"{type(exc).__name__}: {exc}" if isinstance(exc, KeyError) else str(exc)
            raise click.ClickException(message) from exc
    return wrapper

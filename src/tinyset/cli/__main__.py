"""``python -m tinyset.cli``: the same as the ``tinyset`` command (its :func:`~tinyset.cli.entry`, with
the same exit handling after a signal)."""
from tinyset.cli import entry

if __name__ == "__main__":  # pragma: no cover
    entry()

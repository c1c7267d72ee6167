"""``python -m tinyset.cli``: the same as the ``tinyset`` command."""
import sys

from tinyset.cli import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

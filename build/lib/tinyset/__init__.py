"""tinyset: dataset distillation and coreset selection toolkit."""

__version__ = "0.1.0"

from tinyset.errors import TinysetError  # noqa: E402

__all__ = ["__version__", "TinysetError"]

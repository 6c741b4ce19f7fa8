"""Data feeding whose position lives in the train state (see :class:`Loader`)."""

from functrain.data.loader import Loader

__all__ = ["Loader"]

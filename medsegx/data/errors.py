"""The data layer's errors: bad slices in a MedSegDB tree, and source data that cannot be converted."""
from __future__ import annotations

from ..errors import UserError


class DataError(ValueError):
    """Bad data found with ``strict=True``, or a slice that can no longer be read as indexed."""


class ConversionError(UserError, ValueError):
    """A case that cannot be converted; the message names the offending file and the problem."""

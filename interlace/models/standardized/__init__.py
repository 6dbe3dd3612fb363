"""The standardized transformer: one interface over every decoder family (see `transformer.py`)."""

from .families import FAMILIES, Family
from .layout import RenameConfig, get_ignores, get_rename_dict, get_vocab_size, rename_table
from .structure import StandardizationError
from .transformer import StandardizedTransformer

__all__ = [
    "FAMILIES", "Family", "RenameConfig", "StandardizationError", "StandardizedTransformer", "get_ignores",
    "get_rename_dict", "get_vocab_size", "rename_table",
]

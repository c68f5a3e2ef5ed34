"""Custom ops: a readable reference and a fast path for each, held together by tests."""

from ultramem.ops.lookup import (
    gather_dot,
    gather_dot_reference,
    memory_read,
    weighted_lookup,
    weighted_lookup_reference,
)

__all__ = [
    "gather_dot",
    "gather_dot_reference",
    "memory_read",
    "weighted_lookup",
    "weighted_lookup_reference",
]

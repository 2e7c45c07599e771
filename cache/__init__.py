"""opd.cache: the on-disk formats shared by every stage (see SPEC.md beside this file).

Rollout shards and score shards are Parquet files; score shards carry the teacher's per-position
top-k distributions packed by a codec (`codec.py`). Everything here is imported by several stages,
so it depends on nothing else in opd.
"""

from opd.cache.errors import FingerprintMismatch, FormatError, OpdError

__all__ = ["OpdError", "FormatError", "FingerprintMismatch"]

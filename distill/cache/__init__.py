"""The teacher cache: per-pixel teacher logits stored once, read many times by training.

`format` (on-disk layout, manifest and record schema, fingerprint comparison), `writer`
(CacheWriter), `reader` (TeacherCache), `tools` (verify, info, merge).
"""

from distill.cache.format import FORMAT_VERSION, manifest_differences, read_manifest, teacher_differences
from distill.cache.reader import TeacherCache
from distill.cache.tools import cache_info, merge_cache, refresh_manifest, verify_cache
from distill.cache.writer import CacheWriter

__all__ = [
    "FORMAT_VERSION",
    "CacheWriter",
    "TeacherCache",
    "cache_info",
    "manifest_differences",
    "merge_cache",
    "read_manifest",
    "refresh_manifest",
    "teacher_differences",
    "verify_cache",
]

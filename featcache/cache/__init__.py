"""The feature cache: the contract between extraction and replay (shared/cache-schema.md)."""

from featcache.cache.integrity import content_fingerprint
from featcache.cache.reader import Cache, Split, open_cache
from featcache.cache.schema import ROLES, SCHEMA
from featcache.cache.writer import CacheWriter

__all__ = ["Cache", "CacheWriter", "ROLES", "SCHEMA", "Split", "content_fingerprint", "open_cache"]

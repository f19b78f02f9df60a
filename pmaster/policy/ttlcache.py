"""A bounded, locked cache whose entries expire: the one store behind the SPF, DNSBL and verify caches.

API: ``TtlCache(size, now)``; ``get(key)`` -> value or None (expired entries are dropped); ``store(key, value,
  ttl)`` (ttl in seconds; 0 or less stores nothing); ``len()``. The least recently used entry goes first
  when the cache is full.
Threading: every method takes the cache's lock; session threads share one cache.
"""

import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Hashable, Optional, Tuple


class TtlCache:
    def __init__(self, size: int, now: Callable[[], float] = time.monotonic):
        self.size = size
        self.now = now
        self._lock = threading.Lock()
        self._items: "OrderedDict[Hashable, Tuple[float, Any]]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Optional[Any]:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if item[0] <= self.now():
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return item[1]

    def store(self, key: Hashable, value: Any, ttl: float) -> None:
        if ttl <= 0:
            return
        with self._lock:
            self._items[key] = (self.now() + ttl, value)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

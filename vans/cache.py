"""A bounded in-memory cache: the engine's text embeddings, the trainer's features and context latents."""

from __future__ import annotations

from collections import OrderedDict

from .errors import InputError


class LRUCache:
    """A mapping that holds at most ``max_entries`` values, dropping the least recently used one.
    ``get`` returns None for a missing key (values are never None); ``put`` returns the value."""

    def __init__(self, max_entries: int):
        if max_entries < 1:
            raise InputError(f"cache size {max_entries} is too small; use at least 1 entry")
        self.max_entries = max_entries
        self._items: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key) -> bool:
        return key in self._items

    def get(self, key):
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key, value):
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()

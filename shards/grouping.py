"""Packing training images into groups so each image is stored as few times as possible.

A training group (``shards.manifest``) is a tar sample holding its member images; the
reader draws (reference, text, target) triplets inside a group. Storing one group per
training pair would copy an image once per pair it takes part in; instead:

* ``group_pairs`` (datasets with explicit pairs: CSS mods, Fashion-IQ, CIRR) walks each
  connected component of the pair graph breadth-first and packs its pairs into groups of
  at most ``max_members`` images. A component that fits is one group (every image stored
  once); a larger one is cut into pieces, and an image is copied only into the pieces
  whose pairs need it. Components are never mixed, so an isolated pair is a group of two.
* ``chunk_by_class`` (datasets whose texts are derived from labels: Fashion200k captions,
  MIT-States adjectives) cuts one set of mutually related images into groups of at most
  ``max_members`` (+1) that each hold at least two classes, every image once except one
  copy where a piece would otherwise hold a single class.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field


@dataclass
class PairGroup:
    """Member ids and pairs ``(ref index, target index, texts)`` within them."""

    members: list[str] = field(default_factory=list)
    pairs: list[tuple[int, int, list[str]]] = field(default_factory=list)
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def new_members(self, ref: str, tgt: str) -> int:
        return len({ref, tgt} - self._index.keys())

    def add(self, ref: str, tgt: str, texts: list[str]) -> None:
        for image_id in (ref, tgt):
            if image_id not in self._index:
                self._index[image_id] = len(self.members)
                self.members.append(image_id)
        self.pairs.append((self._index[ref], self._index[tgt], texts))


def group_pairs(pairs: Iterable[tuple[str, str, list[str]]], max_members: int) -> list[PairGroup]:
    """Pack ``(ref id, target id, texts)`` pairs into groups of at most ``max_members`` images.

    Texts of repeated (ref, target) pairs are merged (first-seen order, no duplicates);
    pairs with ref == target are dropped. Deterministic for a given input order.
    """
    if max_members < 2:
        raise ValueError(f"max_members must be >= 2, got {max_members}")
    texts: dict[tuple[str, str], list[str]] = {}
    for ref, tgt, pair_texts in pairs:
        if ref == tgt:
            continue
        merged = texts.setdefault((ref, tgt), [])
        merged.extend(t for t in pair_texts if t not in merged)
    incident: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for ref, tgt in texts:
        incident[ref].append((ref, tgt))
        incident[tgt].append((ref, tgt))

    groups: list[PairGroup] = []
    visited: set[str] = set()
    emitted: set[tuple[str, str]] = set()
    for start in incident:
        if start in visited:
            continue
        visited.add(start)
        queue = deque([start])
        group = PairGroup()
        while queue:
            node = queue.popleft()
            for edge in incident[node]:
                if edge in emitted:
                    continue
                emitted.add(edge)
                ref, tgt = edge
                if group.members and len(group.members) + group.new_members(ref, tgt) > max_members:
                    groups.append(group)
                    group = PairGroup()
                group.add(ref, tgt, texts[edge])
                other = tgt if node == ref else ref
                if other not in visited:
                    visited.add(other)
                    queue.append(other)
        groups.append(group)
    return groups


def chunk_by_class(classes: dict[Hashable, list], max_members: int) -> list[list]:
    """Cut items of two or more classes into chunks that each hold at least two classes.

    ``classes`` maps a class (caption, adjective) to its items. Items are dealt round-robin,
    largest class first, into ``ceil(n / max_members)`` chunks; a chunk left with a single
    class gets one copy of an item of another class. Returns lists of items.
    """
    if len([c for c, items in classes.items() if items]) < 2:
        raise ValueError("chunk_by_class needs items of at least two classes")
    ordered = sorted((c for c in classes if classes[c]), key=lambda c: (-len(classes[c]), str(c)))
    items = [(c, item) for c in ordered for item in classes[c]]
    count = max(1, math.ceil(len(items) / max_members))
    chunks: list[list[tuple[Hashable, object]]] = [[] for _ in range(count)]
    for position, entry in enumerate(items):
        chunks[position % count].append(entry)
    # Donors are taken from the end (the smaller classes), spreading copies over items.
    next_donor = len(items) - 1
    for chunk in chunks:
        own = {c for c, _ in chunk}
        if len(own) >= 2:
            continue
        while items[next_donor % len(items)][0] in own:
            next_donor -= 1
        chunk.append(items[next_donor % len(items)])
        next_donor -= 1
    return [[item for _, item in chunk] for chunk in chunks]


def duplication(groups_members: Iterable[list[str]]) -> dict[str, float]:
    """Stored vs unique images over groups: ``{"stored", "unique", "ratio"}``."""
    stored = 0
    unique: set[str] = set()
    for members in groups_members:
        stored += len(members)
        unique.update(members)
    return {
        "stored": stored,
        "unique": len(unique),
        "ratio": round(stored / len(unique), 4) if unique else 0.0,
    }

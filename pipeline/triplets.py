"""(reference, text, target) triplets inside one training group (``shards.manifest``).

A group either states its pairs (``"pairs"``: Fashion-IQ and CIRR captions, CSS
modification texts) or asks the reader to derive them from member captions
(``"derive"``):

* ``"replace_word"`` (Fashion200k, as in the TIRG code): members i and j form a pair
  when their captions share a *parent caption* -- the caption minus one word -- and the
  removed words differ; the text is ``"replace <word_i> with <word_j>"``.
* ``"change_state"`` (MIT-States, as in the TIRG code): members carry attributes
  ``{"adj": ..., "noun": ...}`` (or ``[adj, noun]``); i and j form a pair when the
  nouns are equal and the adjectives differ; the text is the target adjective.

Every epoch draws triplets afresh: each explicit pair once with a random one of its
texts; in a derived group one triplet per member that has a valid target, the target
drawn at random.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

DERIVE_KINDS = ("replace_word", "change_state")

Pair = tuple[int, int, list[str]]


def derive_pairs(group: dict[str, Any]) -> list[Pair]:
    """Every valid ``(ref_idx, tgt_idx, texts)`` of a group: explicit or derived.

    Raises ``ValueError`` naming the group when its JSON does not follow the format.
    """
    name = group.get("group", "?") if isinstance(group, dict) else "?"
    if not isinstance(group, dict) or not isinstance(group.get("members"), list):
        raise ValueError(f"group {name!r}: expected a JSON object with a 'members' list")
    members = group["members"]
    derive = group.get("derive")
    if derive is None:
        return _explicit_pairs(name, members, group.get("pairs"))
    if derive == "replace_word":
        return _replace_word_pairs(name, members)
    if derive == "change_state":
        return _change_state_pairs(name, members)
    raise ValueError(f"group {name!r}: unknown derive {derive!r}, expected one of {DERIVE_KINDS}")


def draw_triplets(group: dict[str, Any], rng: random.Random) -> list[tuple[int, int, str]]:
    """One epoch's ``(ref_idx, tgt_idx, text)`` triplets of a group (see module doc)."""
    pairs = derive_pairs(group)
    if group.get("derive") is None:
        return [(ref, tgt, rng.choice(texts)) for ref, tgt, texts in pairs]
    by_ref: dict[int, list[tuple[int, list[str]]]] = defaultdict(list)
    for ref, tgt, texts in pairs:
        by_ref[ref].append((tgt, texts))
    triplets = []
    for ref in sorted(by_ref):
        tgt, texts = rng.choice(by_ref[ref])
        triplets.append((ref, tgt, rng.choice(texts)))
    return triplets


def triplets_per_epoch(group: dict[str, Any]) -> int:
    """How many triplets ``draw_triplets`` yields for this group each epoch."""
    pairs = derive_pairs(group)
    if group.get("derive") is None:
        return len(pairs)
    return len({ref for ref, _, _ in pairs})


def group_texts(group: dict[str, Any]) -> list[str]:
    """Every text a group can produce (vocabulary building)."""
    return [text for _, _, texts in derive_pairs(group) for text in texts]


def _explicit_pairs(name: str, members: list, pairs: Any) -> list[Pair]:
    if not isinstance(pairs, list):
        raise ValueError(f"group {name!r}: no 'pairs' list and no 'derive' rule")
    out = []
    for k, pair in enumerate(pairs):
        try:
            ref, tgt, texts = int(pair["ref"]), int(pair["tgt"]), pair["texts"]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"group {name!r} pair {k}: expected ref, tgt, texts ({err})") from err
        if not (0 <= ref < len(members) and 0 <= tgt < len(members)):
            raise ValueError(
                f"group {name!r} pair {k}: ref {ref} / tgt {tgt} outside 0..{len(members) - 1}"
            )
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"group {name!r} pair {k}: 'texts' must be a non-empty list of str")
        out.append((ref, tgt, list(texts)))
    return out


def _caption_words(name: str, index: int, member: dict) -> list[str]:
    caption = member.get("caption", member.get("label"))
    if not isinstance(caption, str):
        raise ValueError(f"group {name!r} member {index}: replace_word needs a 'caption' str")
    return caption.split()


def _parents(words: list[str]) -> dict[tuple[str, ...], set[str]]:
    """Parent caption (words minus one) -> the removed word(s)."""
    parents: dict[tuple[str, ...], set[str]] = defaultdict(set)
    for p, word in enumerate(words):
        parents[tuple(words[:p] + words[p + 1 :])].add(word)
    return parents


def _replace_word_pairs(name: str, members: list) -> list[Pair]:
    words = [_caption_words(name, i, m) for i, m in enumerate(members)]
    parents = [_parents(w) for w in words]
    out = []
    for i in range(len(members)):
        for j in range(len(members)):
            if i == j or words[i] == words[j]:
                continue
            texts = set()
            for parent in parents[i].keys() & parents[j].keys():
                for removed_i in parents[i][parent]:
                    for removed_j in parents[j][parent]:
                        if removed_i != removed_j:
                            texts.add(f"replace {removed_i} with {removed_j}")
            if texts:
                out.append((i, j, sorted(texts)))
    return out


def _adj_noun(name: str, index: int, member: dict) -> tuple[str, str]:
    attrs = member.get("attributes")
    if isinstance(attrs, dict) and "adj" in attrs and "noun" in attrs:
        return str(attrs["adj"]), str(attrs["noun"])
    if isinstance(attrs, list) and len(attrs) == 2:
        return str(attrs[0]), str(attrs[1])
    raise ValueError(
        f"group {name!r} member {index}: change_state needs attributes "
        f"{{'adj': ..., 'noun': ...}}, got {attrs!r}"
    )


def _change_state_pairs(name: str, members: list) -> list[Pair]:
    states = [_adj_noun(name, i, m) for i, m in enumerate(members)]
    return [
        (i, j, [states[j][0]])
        for i in range(len(states))
        for j in range(len(states))
        if states[i][1] == states[j][1] and states[i][0] != states[j][0]
    ]

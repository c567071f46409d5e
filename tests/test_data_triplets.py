"""Training triplet stream: derivation rules, shapes, DDP-safe epoch length, shard split,
epoch reshuffling and corrupt-sample skipping on tiny generated shards."""

from __future__ import annotations

import logging
import random
from collections import Counter

import pytest
import torch
from shard_fixtures import (
    CHANGE_STATE_ATTRIBUTES,
    REPLACE_WORD_CAPTIONS,
    write_dataset,
)

from pipeline.data import group_runs, reader_shards, triplet_loader
from pipeline.shard_groups import build_vocabulary, count_triplets, default_batches_per_epoch
from pipeline.triplets import derive_pairs, draw_triplets

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 7 explicit + 2 derived groups, 2 per shard -> shards of 2, 2, 2, 2, 1 groups (uneven)
    return write_dataset(tmp_path_factory.mktemp("data") / "ds", explicit_groups=7)


@pytest.fixture(scope="module")
def vocab(dataset):
    return build_vocabulary(dataset)


def group_of(member_id: str) -> str:
    return member_id.rsplit("_", 1)[0]


def test_replace_word_pairs_follow_parent_captions():
    group = {
        "group": "f",
        "derive": "replace_word",
        "members": [{"id": str(i), "caption": c} for i, c in enumerate(REPLACE_WORD_CAPTIONS)],
    }
    pairs = {(r, t): texts for r, t, texts in derive_pairs(group)}
    assert pairs == {
        (0, 1): ["replace red with blue"],
        (1, 0): ["replace blue with red"],
        (0, 2): ["replace leather with cotton"],
        (2, 0): ["replace cotton with leather"],
    }


def test_change_state_pairs_need_same_noun():
    group = {
        "group": "m",
        "derive": "change_state",
        "members": [{"id": str(i), "attributes": a} for i, a in enumerate(CHANGE_STATE_ATTRIBUTES)],
    }
    assert derive_pairs(group) == [(0, 1, ["unripe"]), (1, 0, ["ripe"])]
    listed = {
        "group": "m",
        "derive": "change_state",
        "members": [{"attributes": ["old", "car"]}, {"attributes": ["new", "car"]}],
    }
    assert derive_pairs(listed) == [(0, 1, ["new"]), (1, 0, ["old"])]


def test_malformed_groups_raise_naming_the_group():
    with pytest.raises(ValueError, match="g9.*outside"):
        derive_pairs(
            {"group": "g9", "members": [{}], "pairs": [{"ref": 0, "tgt": 3, "texts": ["x"]}]}
        )
    with pytest.raises(ValueError, match="unknown derive"):
        derive_pairs({"group": "g9", "members": [], "derive": "swap"})
    with pytest.raises(ValueError, match="adj"):
        derive_pairs({"group": "g9", "members": [{"caption": "a"}], "derive": "change_state"})


def test_draw_triplets_each_pair_once_or_one_per_member():
    explicit = {
        "members": [{}, {}, {}],
        "pairs": [{"ref": 0, "tgt": 1, "texts": ["a", "b"]}, {"ref": 2, "tgt": 1, "texts": ["c"]}],
    }
    drawn = draw_triplets(explicit, random.Random(0))
    assert [(r, t) for r, t, _ in drawn] == [(0, 1), (2, 1)]
    assert drawn[0][2] in ("a", "b") and drawn[1][2] == "c"
    texts = {draw_triplets(explicit, random.Random(s))[0][2] for s in range(20)}
    assert texts == {"a", "b"}
    derived = {"derive": "replace_word", "members": [{"caption": c} for c in REPLACE_WORD_CAPTIONS]}
    targets = set()
    for s in range(30):
        drawn = draw_triplets(derived, random.Random(s))
        assert [r for r, _, _ in drawn] == [0, 1, 2]  # member 3 has no valid target
        targets.add(drawn[0][1])
    assert targets == {1, 2}  # member 0's target is drawn at random among valid ones


def test_vocabulary_and_epoch_length(dataset, vocab):
    for word in ("replace", "with", "leather", "cotton", "ripe", "unripe", "color6", "shape0"):
        assert word in vocab.index
    assert "silk" not in vocab.index  # member 3's caption derives no text
    assert count_triplets(dataset) == 7 * 2 + 3 + 2
    assert default_batches_per_epoch(dataset, batch_size=4, world_size=2) == 19 // 8
    assert default_batches_per_epoch(dataset, batch_size=64, world_size=2) == 1


def test_batch_shapes_and_derived_texts(dataset, vocab):
    loader = triplet_loader(
        dataset, vocab, batch_size=5, image_size=32, shuffle_buffer=10, batches_per_epoch=8
    )
    batches = list(loader)
    assert len(batches) == len(loader) == 8
    b = batches[0]
    assert b["ref_images"].shape == b["target_images"].shape == (5, 3, 32, 32)
    assert b["ref_images"].dtype == torch.float32
    assert b["tokens"].dtype == torch.int64 and b["tokens"].shape[0] == 5
    assert b["lengths"].tolist() == [len(vocab.encode_ids(t)) for t in b["texts"]]
    seen = Counter()
    for batch in batches:
        for ref, tgt, text in zip(batch["ref_ids"], batch["target_ids"], batch["texts"]):
            if ref.startswith("f200k"):
                i, j = int(ref[-1]), int(tgt[-1])
                wi, wj = REPLACE_WORD_CAPTIONS[i].split(), REPLACE_WORD_CAPTIONS[j].split()
                old, new = (set(wi) - set(wj)).pop(), (set(wj) - set(wi)).pop()
                assert text == f"replace {old} with {new}"
                seen["replace_word"] += 1
            elif ref.startswith("mit"):
                assert text == CHANGE_STATE_ATTRIBUTES[int(tgt[-1])]["adj"]
                assert tgt != ref
                seen["change_state"] += 1
            else:
                assert group_of(ref) == group_of(tgt)
    assert seen["replace_word"] >= 3 and seen["change_state"] >= 2


def test_ranks_yield_same_batch_count_from_disjoint_shards(dataset, vocab):
    per_rank = []
    for rank in range(2):
        loader = triplet_loader(
            dataset,
            vocab,
            batch_size=3,
            image_size=32,
            rank=rank,
            world_size=2,
            loader_workers=2,
            shuffle_buffer=4,
            seed=3,
        )
        batches = list(loader)
        assert len(batches) == len(loader) == default_batches_per_epoch(dataset, 3, 2)
        assert all(len(b["texts"]) == 3 for b in batches)
        per_rank.append({group_of(i) for b in batches for i in b["ref_ids"]})
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]


def test_more_batches_than_data_repeats_without_hanging(dataset, vocab):
    loader = triplet_loader(
        dataset,
        vocab,
        batch_size=4,
        image_size=32,
        rank=1,
        world_size=2,
        loader_workers=2,
        batches_per_epoch=12,
        shuffle_buffer=1,
    )
    assert sum(1 for _ in loader) == 12


def test_reader_shards_partition_and_epoch_shuffle():
    shards = [f"s{i}" for i in range(10)]
    orders = []
    for epoch in range(2):
        parts = [
            reader_shards(
                shards, seed=1, epoch=epoch, rank=r, world_size=2, worker=w, num_workers=2
            )
            for r in range(2)
            for w in range(2)
        ]
        assert all(stride == 1 for _, stride, _ in parts)
        flat = [s for part, _, _ in parts for s in part]
        assert sorted(flat) == sorted(shards)  # disjoint and complete
        orders.append(flat)
    assert orders[0] != orders[1]
    # too few shards: a sample split (auto) or an error (shards)
    part, stride, offset = reader_shards(
        shards[:3], seed=1, epoch=0, rank=1, world_size=2, worker=1, num_workers=2
    )
    assert (sorted(part), stride, offset) == (shards[:3], 4, 3)
    with pytest.raises(ValueError, match="3 shard.*4 readers"):
        reader_shards(
            shards[:3],
            seed=1,
            epoch=0,
            rank=0,
            world_size=2,
            worker=0,
            num_workers=2,
            split_by="shards",
        )


def test_sample_split_fallback_covers_disjoint_groups(dataset, vocab):
    seen = []
    for rank in range(2):
        loader = triplet_loader(
            dataset,
            vocab,
            batch_size=2,
            image_size=32,
            rank=rank,
            world_size=2,
            loader_workers=2,
            split_by="samples",
            batches_per_epoch=3,
            shuffle_buffer=1,
        )
        seen.append({group_of(i) for b in loader for i in b["ref_ids"]})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_epochs_reshuffle_and_runs_are_reproducible(dataset, vocab):
    def run(epoch_count):
        loader = triplet_loader(
            dataset,
            vocab,
            batch_size=4,
            image_size=32,
            seed=7,
            shuffle_buffer=8,
            batches_per_epoch=4,
        )
        return [
            [(r, t) for b in loader for r, t in zip(b["ref_ids"], b["texts"])]
            for _ in range(epoch_count)
        ]

    first, second = run(2), run(2)
    assert first == second  # same seed, same epochs -> same batches
    assert first[0] != first[1]  # a new epoch draws a new order


def test_corrupt_samples_are_skipped_and_counted(tmp_path, caplog):
    data = write_dataset(
        tmp_path / "bad",
        explicit_groups=2,
        derived_groups=False,
        corrupt_image=True,
        corrupt_json=True,
    )
    vocab = build_vocabulary(data)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        batches = list(
            triplet_loader(
                data, vocab, batch_size=2, image_size=32, batches_per_epoch=4, shuffle_buffer=1
            )
        )
    assert len(batches) == 4 and all(len(b["texts"]) == 2 for b in batches)
    assert not any(i.startswith("bad") for b in batches for i in b["ref_ids"])
    messages = [r.getMessage() for r in caplog.records if "corrupt sample" in r.getMessage()]
    assert messages, caplog.text
    assert "undecodable image" in messages[0] and "bad group json" in messages[0]


def test_group_runs_keep_every_triplet_in_shuffled_runs_of_one_group():
    """Runs of exactly k where the group has k triplets: the odd one out of group a is
    paired with a copy of another of a's triplets; group c (1 triplet) stays alone."""
    triplets = [{"group": g, "n": i} for i, g in enumerate("aaaaabbc")]
    runs = list(group_runs(iter(triplets), 2, random.Random(0)))
    assert {t["n"] for run in runs for t in run} == set(range(8))  # nothing lost
    assert all(len({t["group"] for t in run}) == 1 for run in runs)
    assert all(len({t["n"] for t in run}) == len(run) for run in runs)  # distinct in a run
    assert [len(run) for run in runs] == [2, 2, 2, 2, 1]
    drawn = Counter(t["n"] for run in runs for t in run)
    assert sorted(drawn.values()) == [1] * 7 + [2]  # one of a's triplets twice
    assert [t["n"] for t in runs[0] + runs[1]] != [0, 1, 2, 3]  # shuffled


def test_triplets_per_group_puts_a_scene_s_modifications_in_one_batch(dataset, vocab):
    """k = 3: neighbours in a batch share a group far more often than in random batches,
    and the epoch still has its full count of triplets."""

    def epoch(per_group):
        loader = triplet_loader(
            dataset,
            vocab,
            batch_size=6,
            image_size=32,
            seed=3,
            shuffle_buffer=12,
            triplets_per_group=per_group,
            batches_per_epoch=4,
        )
        return [
            (r, t, x) for b in loader for r, t, x in zip(b["ref_ids"], b["target_ids"], b["texts"])
        ]

    grouped, independent = epoch(3), epoch(1)
    assert len(grouped) == len(independent) == 24
    groups = [group_of(ref) for ref, _, _ in grouped]
    same_as_previous = sum(a == b for a, b in zip(groups, groups[1:]))
    independent_groups = [group_of(ref) for ref, _, _ in independent]
    assert same_as_previous > sum(
        a == b for a, b in zip(independent_groups, independent_groups[1:])
    )
    with pytest.raises(ValueError, match="triplets_per_group must be >= 1"):
        triplet_loader(dataset, vocab, batch_size=4, image_size=32, triplets_per_group=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_skips_its_trained_batches_without_decoding_them(
    dataset, vocab, monkeypatch, workers
):
    """``epoch_batches(epoch, skip)`` yields what a full pass yields from batch ``skip``
    on (same triplets, same augmented crops), and decodes none of the skipped images."""
    import pipeline.data as data

    def loader():
        return triplet_loader(
            dataset,
            vocab,
            batch_size=3,
            image_size=16,
            seed=5,
            batches_per_epoch=6,
            shuffle_buffer=8,
            augment=True,
            loader_workers=workers,
        )

    full = list(loader().epoch_batches(1))
    decoded = []
    real_decode = data.decode_image

    def counting_decode(raw, *args, **kwargs):
        decoded.append(1)
        return real_decode(raw, *args, **kwargs)

    monkeypatch.setattr(data, "decode_image", counting_decode)
    resumed = list(loader().epoch_batches(1, skip=4))
    assert len(full) == 6 and len(resumed) == 2
    for want, got in zip(full[4:], resumed):
        assert got["ref_ids"] == want["ref_ids"] and got["texts"] == want["texts"]
        assert torch.equal(got["ref_images"], want["ref_images"])
        assert torch.equal(got["target_images"], want["target_images"])
    if workers == 0:  # (worker processes decode in their own copy of the module)
        assert len(decoded) == 2 * 3 * 2  # two batches of three (reference, target) pairs
    with pytest.raises(ValueError, match="skip must be in 0..6"):
        next(iter(loader().epoch_batches(0, skip=7)))

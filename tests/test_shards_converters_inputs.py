"""Converter inputs: image checks, group packing, and errors for wrong raw layouts."""

from __future__ import annotations

import io
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from raw_datasets import make_cirr, make_css3d, make_mitstates, truncate, write_image

from shards import cirr, conversion, css3d, fashion200k, fashioniq, mitstates
from shards.grouping import chunk_by_class, group_pairs
from shards.imageio import ImageError, check_image, check_images, encoded_image

CONVERTERS = [css3d, fashion200k, mitstates, fashioniq, cirr]


# -- image checks --------------------------------------------------------------------------


def test_jpeg_and_png_are_kept_byte_for_byte(tmp_path):
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png")):
        path = write_image(tmp_path / f"x.{ext}", seed=1, fmt=fmt, size=32)
        checked = check_image(path)
        assert (checked.ext, checked.convert) == (ext, False)
        assert encoded_image(checked).data == path.read_bytes()
    # the extension is taken from the content, not from the name
    wrong_name = write_image(tmp_path / "y.png", seed=2, fmt="JPEG")
    assert check_image(wrong_name).ext == "jpg"


def test_formats_the_reader_cannot_take_become_png(tmp_path):
    gif = tmp_path / "a.gif"
    Image.new("P", (8, 8), 3).save(gif)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(deep)
    for path in (gif, deep):
        checked = check_image(path)
        assert (checked.ext, checked.convert) == ("png", True)
        stored = encoded_image(checked)
        with Image.open(io.BytesIO(stored.data)) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (8, 8))


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("truncate_jpeg", "truncated image"),
        ("truncate_png", "truncated image"),
        ("empty", "empty image file"),
        ("text", "not an image"),
        ("missing", "missing image file"),
    ],
)
def test_unusable_images_name_the_reason(tmp_path, damage, reason):
    path = tmp_path / "img"
    if damage.startswith("truncate"):
        write_image(path, seed=3, fmt="JPEG" if damage.endswith("jpeg") else "PNG", size=64)
        truncate(path, keep=0.6)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "text":
        path.write_text("hello")
    with pytest.raises(ImageError) as err:
        check_image(path)
    assert err.value.reason.startswith(reason) and err.value.path == str(path)


def test_check_images_in_threads_keeps_every_path(tmp_path):
    paths = [write_image(tmp_path / f"{i}.jpg", seed=i) for i in range(12)]
    truncate(paths[5])
    results = check_images(paths + [tmp_path / "none.jpg"], workers=3)
    assert list(results) == [str(p) for p in paths + [tmp_path / "none.jpg"]]
    assert [type(r).__name__ for r in results.values()].count("ImageError") == 2


# -- grouping ------------------------------------------------------------------------------


@pytest.mark.parametrize("max_members", [2, 3, 8])
def test_group_pairs_keeps_every_pair_within_the_size(max_members):
    rng = random.Random(max_members)
    pairs = [(f"i{rng.randrange(30)}", f"i{rng.randrange(30)}", [f"t{k}"]) for k in range(80)]
    pairs.append(("x1", "x2", ["isolated"]))
    groups = group_pairs(pairs, max_members)
    seen = Counter()
    for g in groups:
        assert 2 <= len(g.members) <= max_members and len(set(g.members)) == len(g.members)
        for r, t, texts in g.pairs:
            seen[(g.members[r], g.members[t])] += 1
            assert texts
    expected = {(r, t) for r, t, _ in pairs if r != t}
    assert set(seen) == expected and set(seen.values()) == {1}
    # a separate component is never mixed into another group
    assert any(g.members == ["x1", "x2"] for g in groups)


def test_group_pairs_merges_texts_of_repeated_pairs():
    [group] = group_pairs([("a", "b", ["t1"]), ("a", "b", ["t2", "t1"]), ("b", "a", ["t3"])], 8)
    assert group.members == ["a", "b"]
    assert group.pairs == [(0, 1, ["t1", "t2"]), (1, 0, ["t3"])]


@pytest.mark.parametrize("sizes", [[5, 1], [1, 1, 1], [20, 3, 3], [4, 4, 4, 4], [1, 30]])
def test_chunk_by_class_mixes_classes_and_stores_items_once(sizes):
    classes = {f"c{k}": [f"c{k}-{i}" for i in range(n)] for k, n in enumerate(sizes)}
    chunks = chunk_by_class(classes, max_members=4)
    items = Counter(item for chunk in chunks for item in chunk)
    assert set(items) == {i for v in classes.values() for i in v}
    assert sum(items.values()) - len(items) <= len(chunks)  # at most one copy per chunk
    for chunk in chunks:
        assert len({item.split("-")[0] for item in chunk}) >= 2 and len(chunk) <= 5


# -- errors and atomicity ------------------------------------------------------------------


@pytest.mark.parametrize("module", CONVERTERS, ids=lambda m: m.__name__)
def test_wrong_layout_is_one_error_with_exit_code_2(module, tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "README").write_text("not a dataset")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--src", str(tmp_path / "raw"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "expected" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_missing_src_and_existing_out(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mitstates.main(["--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "nowhere: no such directory" in capsys.readouterr().err

    make_mitstates(tmp_path / "raw")
    args = ["--src", str(tmp_path / "raw"), "--out", str(tmp_path / "out"), "--read-threads", "1"]
    mitstates.main(args)
    with pytest.raises(SystemExit) as exit_info:
        mitstates.main(args)
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    mitstates.main([*args, "--overwrite"])
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_bad_css_file_and_bad_json_are_layout_errors(tmp_path, capsys):
    make_css3d(tmp_path / "css")
    (tmp_path / "css" / css3d.DATA_FILE).write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(SystemExit) as exit_info:
        css3d.main(["--src", str(tmp_path / "css"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "cannot read the pickled CSS dict" in capsys.readouterr().err

    make_cirr(tmp_path / "cirr")
    (tmp_path / "cirr" / "captions" / "cap.rc2.val.json").write_text('{"not": "a list"}')
    with pytest.raises(SystemExit):
        cirr.main(["--src", str(tmp_path / "cirr"), "--out", str(tmp_path / "out")])
    assert "cap.rc2.val.json: expected a JSON list, got dict" in capsys.readouterr().err


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    make_mitstates(tmp_path / "raw")

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mitstates, "write_gallery", fail)
    assert conversion.write_gallery is not fail
    with pytest.raises(KeyboardInterrupt):
        mitstates.main(["--src", str(tmp_path / "raw"), "--out", str(tmp_path / "out")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]

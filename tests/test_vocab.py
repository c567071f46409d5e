import pytest
import torch

from pipeline.vocab import PAD_ID, UNK_ID, Vocabulary, tokenize


def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize("Make the RED circle, blue!") == [
        "make",
        "the",
        "red",
        "circle",
        ",",
        "blue",
        "!",
    ]


def test_encode_pads_and_reports_lengths():
    vocab = Vocabulary.build(["add red circle", "remove blue square"])
    tokens, lengths = vocab.encode(["add red circle", "remove"])
    assert tokens.shape == (2, 3) and tokens.dtype == torch.long
    assert lengths.tolist() == [3, 1]
    assert tokens[1, 1:].tolist() == [PAD_ID, PAD_ID]
    assert vocab.decode(tokens[0].tolist()) == "add red circle"


def test_unknown_and_empty_text_map_to_unk():
    vocab = Vocabulary.build(["add red circle"])
    tokens, lengths = vocab.encode(["", "zebra"])
    assert tokens[:, 0].tolist() == [UNK_ID, UNK_ID]
    assert lengths.tolist() == [1, 1]


def test_round_trip(tmp_path):
    vocab = Vocabulary.build(["a b c", "c d"])
    vocab.save(tmp_path / "v.json")
    again = Vocabulary.load(tmp_path / "v.json")
    assert again.words == vocab.words


@pytest.mark.parametrize("bad", ["one string", []])
def test_bad_batches_are_clear_errors(bad):
    vocab = Vocabulary.build(["a"])
    with pytest.raises((TypeError, ValueError)):
        vocab.encode(bad)

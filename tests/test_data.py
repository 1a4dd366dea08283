"""Calibration data: seeded windows from a local text, hashed ids, clear errors."""

import pytest
import torch

from latmix.data import LOCAL_TEXTS, calibration_batches, sample_windows, token_digest, token_stream


class CharTokenizer:
    """A tokenizer with the Hugging Face call signature: one id per character."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) % 256 for c in text]}


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(200)))
    return path


def test_calibration_batches_have_the_requested_shape_and_come_from_the_text(text_file):
    ids, digest = calibration_batches(
        CharTokenizer(), "local", n_samples=4, seq_len=64, seed=0, path=text_file
    )
    assert ids.shape == (4, 64) and ids.dtype == torch.long
    stream = token_stream(CharTokenizer(), "local", path=text_file).tolist()
    for row in ids.tolist():
        starts = [i for i in range(len(stream) - 63) if stream[i : i + 64] == row]
        assert starts, "every sequence is a contiguous window of the training text"
    assert digest == token_digest(ids) and len(digest) == 64


def test_same_seed_same_ids_other_seed_other_ids(text_file):
    a, da = calibration_batches(CharTokenizer(), "local", 4, 64, seed=1, path=text_file)
    b, db = calibration_batches(CharTokenizer(), "local", 4, 64, seed=1, path=text_file)
    c, dc = calibration_batches(CharTokenizer(), "local", 4, 64, seed=2, path=text_file)
    assert torch.equal(a, b) and da == db
    assert not torch.equal(a, c) and da != dc


def test_embedded_default_has_disjoint_calibration_and_held_out_text():
    train = token_stream(CharTokenizer(), "local", "train")
    held_out = token_stream(CharTokenizer(), "local", "validation")
    assert train.numel() > 100_000 and held_out.numel() > 10_000
    calibration_text, held_out_text = LOCAL_TEXTS["train"].read_text(), LOCAL_TEXTS["validation"].read_text()
    assert held_out_text[1000:1200] not in calibration_text


def test_digest_depends_only_on_values():
    ids = torch.arange(12).reshape(3, 4)
    assert token_digest(ids) == token_digest(ids.t().contiguous().t().to(torch.int32))
    assert token_digest(ids) != token_digest(ids + 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": "pile"}, "source='pile' is not supported"),
        ({"split": "dev"}, "split='dev' is not supported"),
        ({"seq_len": 100_000}, "lower seq_len"),
        ({"n_samples": 0}, "n_samples >= 1"),
    ],
)
def test_bad_input_says_what_to_change(text_file, kwargs, message):
    args = {"source": "local", "n_samples": 2, "seq_len": 16, "seed": 0, "path": text_file, **kwargs}
    with pytest.raises(ValueError, match=message):
        calibration_batches(CharTokenizer(), **args)


def test_missing_local_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        calibration_batches(CharTokenizer(), "local", 2, 16, path=tmp_path / "nope.txt")


def test_windows_are_drawn_from_the_whole_stream():
    stream = torch.arange(10_000)
    windows = sample_windows(stream, n_samples=64, seq_len=8, seed=0)
    assert windows[:, 0].min() < 2_000 and windows[:, 0].max() > 8_000
    assert torch.equal(windows[:, 1:] - windows[:, :-1], torch.ones(64, 7, dtype=torch.long))

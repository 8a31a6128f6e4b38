"""Every Hugging Face family of tests/hf_matrix.py through the oracle: compacted == masked on inputs the
compaction never saw, parameter counts as the masks imply, saved and loaded back (see hf_matrix.py).

The families people name when they prune must compact exactly; the others must compact exactly or be refused
with one of slimtorch's typed errors (model untouched), never a wrong model or an untyped crash.
"""

import pytest

import slimtorch
from hf_matrix import ALL, EXTRA, FAMILIES, check
from slimtorch.errors import CompactionError, UnsupportedOpError

#: families beyond the named ones that are refused, and the error that says why
REFUSED: dict[str, type[slimtorch.SlimError]] = {
    "wav2vec2": UnsupportedOpError,  # its positional convolution's weight is computed in forward (weight norm)
    "xglm": CompactionError,  # its sinusoidal position table (a buffer) is reshaped to the full hidden size
    "hubert": UnsupportedOpError,  # as wav2vec2
    "mobilebert": CompactionError,  # its bottleneck layers: the compacted model fails the check, and is restored
    "gpt-oss": UnsupportedOpError,  # its router's top-k: experts with biases and another router layout
    "deepseek-v3": CompactionError,  # multi-head latent attention: the compacted model fails the check, restored
}
#: families that compact exactly but whose parameter count differs from the one the masks imply
COUNT_DIFFERS = {"nemotron": "its LayerNorm1P weights (x * (1 + w)) of removed channels go though no mask zeroes them"}


def test_the_matrix_covers_every_kind():
    kinds = {kind for kind, _ in FAMILIES.values()}
    assert len(FAMILIES) >= 30 and kinds >= {"encoder", "decoder", "encoder-decoder", "vision", "audio", "moe"}
    assert set(REFUSED) <= set(EXTRA)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_named_family_compacts_exactly(name):
    check(name)


def _extra(name):
    marks = [pytest.mark.slow]  # (the named families keep the default run short; these double it)
    if name in COUNT_DIFFERS:
        marks.append(pytest.mark.xfail(strict=True, raises=AssertionError, reason=COUNT_DIFFERS[name]))
    return pytest.param(name, marks=marks)


@pytest.mark.parametrize("name", [_extra(n) for n in EXTRA])
def test_more_families_compact_exactly_or_say_why(name):
    if name in REFUSED:
        with pytest.raises(REFUSED[name]):
            check(name)
    else:
        check(name)


def test_every_family_is_listed_once():
    assert len(ALL) == len(FAMILIES) + len(EXTRA)

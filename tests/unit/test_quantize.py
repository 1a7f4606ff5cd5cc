import numpy as np
import pytest
from sentence_transformers.util import quantize_embeddings

from inferd.encoder.quantize import quantize
from inferd.errors import InvalidRequestError


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_matches_sentence_transformers(precision):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(7, 36)).astype(np.float32)
    ours = quantize(vectors, precision)
    reference = quantize_embeddings(vectors, precision)
    assert ours.dtype == reference.dtype
    np.testing.assert_array_equal(ours, reference)


def test_float_is_float32_unchanged():
    vectors = np.arange(6, dtype=np.float64).reshape(2, 3)
    out = quantize(vectors, "float")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, vectors)


def test_scalar_types_need_two_vectors_to_calibrate():
    with pytest.raises(InvalidRequestError, match="at least two"):
        quantize(np.ones((1, 8), np.float32), "int8")

import pytest
import torch
from sentence_transformers import models as st_models

from inferd.encoder.pooling import pool, pooling_modes


@pytest.mark.parametrize("mode", ["cls", "mean", "max", "lasttoken", "mean_sqrt_len_tokens", "weightedmean"])
def test_each_mode_matches_sentence_transformers(mode):
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    reference = st_models.Pooling(8, pooling_mode=mode)({"token_embeddings": hidden, "attention_mask": mask})[
        "sentence_embedding"
    ]
    torch.testing.assert_close(pool(hidden, mask, (mode,)), reference, rtol=1e-5, atol=1e-5)


def test_legacy_and_current_configs_name_the_same_modes():
    legacy = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}
    assert pooling_modes(legacy) == ("mean",)
    assert pooling_modes({"pooling_mode": ["cls", "max"]}) == ("cls", "max")
    assert pooling_modes({}) == ("mean",)
    with pytest.raises(ValueError, match="unsupported"):
        pooling_modes({"pooling_mode": "median"})

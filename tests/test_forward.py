import pytest
import torch

from helpers import tiny_model
from recoup import RecoupError
from recoup.model.forward import build_inputs, forward_logits


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "qwen2"])
def test_left_padding_matches_unpadded(arch):
    model = tiny_model(arch)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    ref = forward_logits(model, ids)
    padded = torch.tensor([[0, 0, 5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    out = forward_logits(model, padded, mask)[:, 2:]
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_prefix_equals_prepending_token_embeddings(arch):
    model = tiny_model(arch)
    ids = torch.tensor([[5, 6, 7, 8]])
    pre_ids = torch.tensor([[10, 11, 12]])
    prefix = model.get_input_embeddings()(pre_ids)[0]
    with torch.no_grad():
        out = forward_logits(model, ids, None, prefix)
        ref = forward_logits(model, torch.cat([pre_ids, ids], 1))[:, 3:]
    assert out.shape == (1, 4, ref.shape[-1])
    assert torch.allclose(out, ref, atol=1e-5)


def test_prefix_of_wrong_hidden_size_is_one_clear_error():
    model = tiny_model("llama", hidden=32)
    with pytest.raises(RecoupError, match="hidden size 48 does not match the model's 32"):
        build_inputs(model, torch.tensor([[1, 2]]), None, torch.zeros(3, 48))

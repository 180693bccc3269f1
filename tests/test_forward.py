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


def test_cached_paths_use_this_transformers_cache_name(monkeypatch):
    """The scorer's continuation, IDP's one prefill and cached decoding pass and read the KV cache under the
    installed transformers' own name: transformers logs no deprecated-name warning (5.x renamed
    ``past_key_values`` to ``cache``; the old name is a shim that may go)."""
    import transformers.utils.generic as generic
    from helpers import tiny_loaded, tiny_tokenizer

    from recoup.evaluate.latency import LatencyConfig, measure_latency
    from recoup.evaluate.scorer import Scorer
    from recoup.recover.idp import IDPPool

    said: list[str] = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: said.append(str(msg)), raising=False)
    lm = tiny_loaded("llama", layers=2)
    torch.manual_seed(0)
    pool = IDPPool(torch.randn(2, 3, 32), select_layers=1)
    for recovery in (None, pool):
        scorer = Scorer(lm.model, tiny_tokenizer(), recovery=recovery, progress=False)
        assert len(scorer.loglikelihood_tokens([((5, 6, 7), (8, 9)), ((10, 11), (12,))])) == 2
        measure_latency(
            lm.model, torch.tensor([[5, 6, 7, 8]]), recovery, LatencyConfig(prompt_len=4, new_tokens=2, repeats=1)
        )
    assert not [m for m in said if "deprecated" in m], said

import pytest
import torch
from helpers import tiny_model

from recoup import RecoupError, anatomy
from recoup.model.anatomy import ARCHITECTURES

ARCHS = sorted(ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_maps_its_parts(arch):
    model = tiny_model(arch, hidden=32, layers=3)
    an = anatomy(model)
    assert an.model_type == arch
    assert len(an.layers) == 3
    assert an.hidden_size == 32
    assert an.embed.weight.shape[1] == 32
    assert an.lm_head.weight.shape[-1] == 32
    names = [n for n, _ in an.iter_linears()]
    assert len(names) == 3 * len(an.linear_names()) and len(set(names)) == len(names)
    for _, mod in an.iter_linears():
        w = an.weight_matrix(mod)
        assert w.dim() == 2
    # the MLP input linear reads hidden-size inputs and the last linear writes hidden-size outputs
    first = an.linears(an.layers[0])
    assert an.weight_matrix(first[an.spec.sequential[0][0]]).shape[1] == 32
    assert an.weight_matrix(first[an.spec.sequential[-1][-1]]).shape[0] == 32
    # the final norm is applied to hidden states
    out = an.final_norm(torch.randn(1, 2, 32))
    assert out.shape == (1, 2, 32)
    targets = an.peft_target_modules()
    assert targets and all("." not in t for t in targets)


def test_unknown_architecture_names_the_supported_ones():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=50)
    )
    with pytest.raises(RecoupError, match="unsupported architecture 'bert'.*llama"):
        anatomy(model)

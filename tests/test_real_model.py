"""Real-model checks on the bundled default (need `recoup setup`); marked slow."""

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    from recoup import load_model

    return load_model("smollm2-135m")


def test_bundled_model_is_the_expected_llama(smollm):
    from recoup import anatomy

    an = anatomy(smollm.model)
    assert an.model_type == "llama" and an.hidden_size == 576 and len(an.layers) == 30
    assert smollm.tokenizer.chat_template


def test_full_ptb_test_perplexity_reproduces_the_reference(smollm):
    """fp32, PTB test, 2048-token windows, GPTQ protocol: 46.70 +- 0.3%."""
    from recoup.evaluate.perplexity import perplexity

    res = perplexity(smollm.model, smollm.tokenizer, "ptb", "test", seqlen=2048)
    assert res.windows == 47
    assert res.ppl == pytest.approx(46.70, rel=0.003)

"""The layer streamer walks the decoder layers: after every layer has propagated, its activations are the model's
own inputs to the final norm, in place, offloaded and with lazy weights (a skeleton read layer by layer)."""

from __future__ import annotations

import pytest
import torch
from helpers import save_tiny, tiny_loaded

from recoup.errors import RecoupError
from recoup.model.anatomy import anatomy
from recoup.model.lazy import load_lazy
from recoup.model.streamer import LayerStreamer, hooked

IDS = torch.randint(4, 100, (6, 20), generator=torch.Generator().manual_seed(0))


def _final_norm_input(model) -> torch.Tensor:
    got = []
    anat = anatomy(model)
    with torch.no_grad(), hooked(anat.final_norm.register_forward_pre_hook(lambda _m, a: got.append(a[0]))):
        model(input_ids=IDS, use_cache=False)
    return got[0]


def _walk(streamer: LayerStreamer, batch_size: int = 4) -> torch.Tensor:
    streamer.capture(IDS, batch_size)
    with torch.no_grad():
        for i in range(streamer.num_layers):
            with streamer.layer(i) as layer:
                assert all(p.device == streamer.device for p in layer.parameters())
                streamer.propagate(i, batch_size)
    return streamer.inps


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "opt", "gpt2"])
def test_streamed_layers_give_the_models_hidden_states(arch):
    lm = tiny_loaded(arch, hidden=32, layers=3)
    want = _final_norm_input(lm.model)
    in_place = _walk(LayerStreamer(lm.model))
    offloaded = _walk(LayerStreamer(lm.model, offload=True))
    torch.testing.assert_close(in_place, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(in_place, offloaded)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lazy_streamer_equals_the_loaded_model(tmp_path, arch):
    lm = save_tiny(tmp_path / "m", arch, hidden=32, layers=3)
    loaded, weights = load_lazy(str(tmp_path / "m"))
    lazy = _walk(LayerStreamer(loaded.model, weights=weights))
    assert torch.equal(lazy, _walk(LayerStreamer(lm.model)))
    assert weights.alive() == []  # every layer and the embeddings freed again


def test_offload_false_needs_the_model_on_the_execution_device():
    lm = tiny_loaded("llama", hidden=32, layers=1)
    with pytest.raises(RecoupError, match="offload=False"):
        LayerStreamer(lm.model, device=torch.device("meta"), offload=False)

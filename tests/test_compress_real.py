"""Compression on the real bundled model (slow: run with `pytest -m slow`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recoup.compress import CompressConfig, compress
from recoup.compress.artifact import compression_fingerprint
from recoup.compress.masks import is_nm
from recoup.data.calibration import calibration_windows
from recoup.evaluate.perplexity import perplexity
from recoup.model.anatomy import anatomy
from recoup.model.load import load_model

pytestmark = pytest.mark.slow
ARTIFACTS = Path("/work/artifacts")


def _ppl(lm) -> float:
    return perplexity(lm.model, lm.tokenizer, "ptb", "test", seqlen=512, limit=2).ppl


def test_wanda_2_4_beats_magnitude_2_4_on_the_real_model():
    dense = load_model("smollm2-135m")
    cal = calibration_windows(dense.tokenizer, "ptb", 8, 256, 0)
    base = _ppl(dense)
    compress(dense, CompressConfig(method="wanda", pattern="2:4"), cal)
    wanda = _ppl(dense)
    for _, mod in anatomy(dense.model).iter_linears():
        assert is_nm(mod.weight, 2, 4)
    mag = load_model("smollm2-135m")
    compress(mag, CompressConfig(method="magnitude", pattern="2:4"))
    assert base < wanda < _ppl(mag)


@pytest.mark.skipif(not (ARTIFACTS / "smollm2-8x" / "recoup.json").is_file(), reason="8x artifact not built")
def test_8x_artifact_is_exactly_half_zeros_and_on_grid():
    lm = load_model(str(ARTIFACTS / "smollm2-8x"))
    fp = compression_fingerprint(lm.model, lm.manifest)
    assert fp["all_on_grid"] is True
    assert all(e["zeros"] * 2 == e["numel"] for e in fp["linears"].values())
    assert lm.manifest["calibration"]["nsamples"] == 128 and lm.manifest["calibration"]["seqlen"] == 512
    x = torch.randint(0, 1000, (1, 32))
    again = load_model(str(ARTIFACTS / "smollm2-8x"))
    assert torch.equal(lm.model(x).logits, again.model(x).logits)

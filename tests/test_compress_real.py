"""Compression on the real bundled model (slow: run with `pytest -m slow`)."""

from __future__ import annotations

import pytest
import torch

from recoup.artifact import load_model
from recoup.artifact.fingerprint import compression_fingerprint
from recoup.compress import CompressConfig, compress
from recoup.compress.masks import is_nm
from recoup.data.calibration import calibration_windows
from recoup.evaluate.perplexity import perplexity
from recoup.model.anatomy import anatomy

pytestmark = pytest.mark.slow


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


def test_joint_8x_artifact_is_exactly_half_zeros_on_grid_and_packed(tmp_path):
    """The 8x recipe (SparseGPT 50% + 4-bit sym g64) on the real model, saved packed and reloaded
    (short calibration: the properties do not depend on its size)."""
    from recoup.artifact.store import save_artifact

    lm = load_model("smollm2-135m")
    cal = calibration_windows(lm.tokenizer, "ptb", 8, 256, 0)
    cfg = CompressConfig(method="sparsegpt", sparsity=0.5, bits=4, group_size=64, sym=True)
    report = compress(lm, cfg, cal)
    out = save_artifact(lm, report, tmp_path / "8x")
    art = load_model(str(out))
    fp = compression_fingerprint(art.model, art.manifest)
    assert fp["all_on_grid"] is True
    assert all(e["zeros"] * 2 == e["numel"] for e in fp["linears"].values())
    n_linears = len(list(anatomy(art.model).iter_linears()))
    assert art.manifest["storage"]["packed_linears"] == {"mask_codes": n_linears}
    x = torch.randint(0, 1000, (1, 32))
    assert torch.equal(lm.model(x).logits, art.model(x).logits)

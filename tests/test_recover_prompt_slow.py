"""Real-model checks of prompt recovery (bundled SmolLM2-135M; run with `pytest -m slow`)."""

from __future__ import annotations

import hashlib

import pytest
import torch

pytestmark = pytest.mark.slow


def test_soft_prompt_on_real_model_lowers_validation_loss_and_keeps_weights(tmp_path):
    from peft import PeftModel

    from recoup.artifact import load_model
    from recoup.recover.losses import lm_loss
    from recoup.recover.methods import load_recovery
    from recoup.recover.soft_prompt import SoftPromptConfig, fit_soft_prompt

    lm = load_model("smollm2-135m")
    h = hashlib.sha256()
    for t in lm.model.state_dict().values():
        h.update(t.contiguous().numpy().tobytes())
    prompt, result = fit_soft_prompt(
        lm, SoftPromptConfig(tokens=8, seqlen=64, batch_size=2, steps=6, eval_every=6, val_windows=2, lr=3e-2)
    )
    h2 = hashlib.sha256()
    for t in lm.model.state_dict().values():
        h2.update(t.contiguous().numpy().tobytes())
    assert h.hexdigest() == h2.hexdigest()
    assert result.best_val_loss < prompt.meta["train"]["val_loss_without_prompt"]
    prompt.save(tmp_path / "sp")
    x = torch.tensor(
        [
            lm.tokenizer(
                "the market closed higher on friday as investors bought shares", add_special_tokens=False
            ).input_ids
        ]
    )
    again = load_recovery(tmp_path / "sp")
    with torch.no_grad():
        ours = lm_loss(lm.model, x, again.prefix(lm.model, x, x)).item()
        labels = x.clone()
        labels[:, 0] = -100
        theirs = PeftModel.from_pretrained(lm.model, str(tmp_path / "sp"))(input_ids=x, labels=labels).loss.item()
    assert abs(ours - theirs) < 1e-4

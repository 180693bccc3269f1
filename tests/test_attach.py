"""A recovery is attached once per evaluation, however many passes (per-task limits) the evaluation makes."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import save_tiny
from test_run import write_corpus

from recoup.recover.adapter import LoraConfig, LoraRecovery


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny saved model, two text files and a saved LoRA whose B is non-zero (it changes the model's outputs)."""
    tmp = tmp_path_factory.mktemp("attach")
    lm = save_tiny(tmp / "model", "llama", hidden=32, layers=2)
    rec = LoraRecovery.for_model(lm.model, LoraConfig(rank=4))
    wrapped = rec.apply(lm.model, seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    rec.capture(wrapped)
    rec.save(tmp / "lora")
    texts = [write_corpus(tmp / f"{name}.txt", 800, seed=seed) for name, seed in (("a", 1), ("b", 2))]
    return tmp / "model", tmp / "lora", *texts


def _lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_two_evaluation_passes_attach_the_recovery_once_and_score_what_one_pass_scores(setup, monkeypatch):
    from recoup.artifact import load_model
    from recoup.evaluate.runner import EvalSettings, evaluate
    from recoup.recipe.jobs import EvalJob
    from recoup.recover.methods import load_recovery
    from recoup.runs import stages

    model, lora, a, b = setup
    attached = []
    apply = LoraRecovery.apply

    def counted(self, m, seed=None):
        out = apply(self, m, seed)
        attached.append(out)
        return out

    monkeypatch.setattr(LoraRecovery, "apply", counted)
    tasks = [f"ppl:{a}", f"ppl:{b}"]
    job = EvalJob(model=str(model), tasks=tasks, limit=3, limits={tasks[1]: 2}, seqlen=32, recovery=str(lora))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = stages.evaluate(job)  # two passes: one per distinct limit
    assert len(attached) == 1, f"the recovery was attached {len(attached)} times"
    layers = _lora_layers(attached[0])
    assert layers and all(list(m.lora_A) == ["default"] for m in layers)  # one adapter per adapted linear
    assert not any(isinstance(m.base_layer, type(m)) for m in layers)  # no LoRA wrapped inside another
    peft_said = [str(w.message) for w in caught if "peft" in w.filename or "adapter" in str(w.message).lower()]
    assert not peft_said, peft_said
    # the same numbers as each task scored alone, the recovery attached on a fresh model; and not the base's
    for task, limit in ((tasks[0], 3), (tasks[1], 2)):
        settings = EvalSettings(seqlen=32, limit=limit)
        alone = evaluate(load_model(str(model)), [task], settings, load_recovery(lora))["results"][task]["ppl"]
        plain = evaluate(load_model(str(model)), [task], settings)["results"][task]["ppl"]
        assert out["results"][task]["ppl"] == alone != plain

"""Training objectives (lm | kd | lm+kd) shared by every trained recovery method."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import save_tiny, tiny_model

from recoup.errors import RecoupError
from recoup.recover.losses import Objective, kd_loss, prefixed_loss
from recoup.recover.task_data import Sequence, collate

BATCH = collate([Sequence(ids=list(range(5, 25))), Sequence(ids=list(range(30, 42)), first_scored=4)], 0)


def test_kd_is_zero_when_student_is_teacher_and_positive_otherwise():
    model = tiny_model("llama")
    with torch.no_grad():
        assert float(Objective("kd", model)(model, BATCH, "cpu")) == pytest.approx(0.0, abs=1e-6)
        lm = float(prefixed_loss(model, BATCH, "cpu"))
        assert float(Objective("lm+kd", model, weight=3.0)(model, BATCH, "cpu")) == pytest.approx(lm, rel=1e-6)
        assert float(Objective("lm")(model, BATCH, "cpu")) == lm
        assert float(Objective("kd", tiny_model("llama", seed=1))(model, BATCH, "cpu")) > 1e-3


def test_kd_loss_is_t_squared_kl_over_scored_positions():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    labels = torch.tensor([[-100, 1, 2, 3], [-100, -100, 2, -100]])
    keep = torch.tensor([0, 1, 2])
    rows = [(0, 0), (0, 1), (0, 2), (1, 1)]  # positions whose next token is scored
    want = (
        sum(
            float(
                (F.softmax(t[b, k] / 2, -1) * (F.log_softmax(t[b, k] / 2, -1) - F.log_softmax(s[b, k] / 2, -1))).sum()
            )
            for b, k in rows
        )
        / len(rows)
        * 4
    )
    assert float(kd_loss(s, t, keep, labels, temperature=2.0)) == pytest.approx(want, rel=1e-5)


def test_bad_objectives_are_one_clear_line():
    from recoup.recover.train import FitConfig

    with pytest.raises(RecoupError, match="unknown objective 'kl'"):
        FitConfig(objective="kl")
    with pytest.raises(RecoupError, match="kd_temperature"):
        FitConfig(objective="kd", kd_temperature=0)
    with pytest.raises(RecoupError, match="needs a teacher"):
        Objective("kd")
    from helpers import tiny_loaded

    with pytest.raises(RecoupError, match="not a compressed artifact"):
        FitConfig(objective="kd").objective_loss(tiny_loaded("llama"))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from recoup.artifact.store import save_artifact
    from recoup.compress import CompressConfig, compress

    tmp = tmp_path_factory.mktemp("kd")
    lm = save_tiny(tmp / "dense")
    rep = compress(lm, CompressConfig(method="magnitude", sparsity=0.5), None)
    text = tmp / "text.txt"
    text.write_text("\n".join(f"line {i}: the cat sat on mat number {i * 7 % 13}." for i in range(300)))
    return save_artifact(lm, rep, tmp / "art"), text


@pytest.mark.parametrize("method", ["soft-prompt", "idp", "lora", "cpet"])
def test_every_objective_through_the_registry(method, artifact):
    """The same keys on every trained method; at step 0 (same seed, same init, same batch) lm+kd = lm + w x kd."""
    from recoup.artifact import load_model
    from recoup.recover.methods import RECOVERIES
    from recoup.recover.task_data import training_data

    art, text = artifact
    spec = RECOVERIES.get(method)
    assert spec.trains and {"objective", "kd_temperature", "kd_weight", "teacher"} <= set(spec.config.field_names())
    first = {}
    for objective in ("lm", "kd", "lm+kd"):
        loaded = load_model(str(art))
        cfg = spec.config.from_dict(
            {
                "data": str(text),
                "seqlen": 16,
                "batch_size": 2,
                "steps": 2,
                "eval_every": 2,
                "objective": objective,
                "kd_weight": 0.5,
                "kd_temperature": 1.5,
            }
        )
        rec, result = spec.fit(loaded, cfg, training_data(loaded.tokenizer, cfg))
        assert result.steps == 2 and all(math.isfinite(x) for x in result.train_loss)
        first[objective] = result.train_loss[0]
    assert first["kd"] > 0
    assert first["lm+kd"] == pytest.approx(first["lm"] + 0.5 * first["kd"], rel=1e-4)

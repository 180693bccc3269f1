"""Every compress / eval / recover flag is a recipe key (and the reverse); a recover step takes every
recovery method; `recoup run --dry-run` validates and plans without loading a model."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from helpers import needs_packs
from test_run import tiny_recipe

from recoup.cli import build_parser, main
from recoup.recipe import RUN_DECIDES_EVAL, Evaluation, load_recipe, validate
from recoup.recipe.jobs import keys


def _flags(command: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {a.dest for a in sub.choices[command]._actions if a.dest not in ("help", "func")}


@pytest.mark.parametrize("command,kind", [("compress", "compress"), ("eval", "evaluate"), ("recover", "recover")])
def test_cli_flags_are_the_job_keys(command, kind):
    assert _flags(command) == {k.name for k in keys(kind)}


def test_every_key_is_a_recipe_key():
    base = {"name": "t", "model": "smollm2-135m", "evaluate": {"tasks": ["ppl:ptb"]}}
    # compress: every key but what the run decides, in one step (values: their defaults)
    step = {
        k.name: k.default
        for k in keys("compress")
        if k.name not in ("model", "out", "force") and (k.methods is None or "gptq" in k.methods)
    }
    step.update(name="q", method="gptq", bits=4, group_size=64, sparsity=None)
    validate({**base, "compress": [step]})
    # evaluate: the section takes every EvalJob key the run does not decide
    assert {f.name for f in dataclasses.fields(Evaluation)} - {"dense"} == {k.name for k in keys("evaluate")} - set(
        RUN_DECIDES_EVAL
    )


@pytest.mark.parametrize(
    "method,extra",
    [
        ("lora", {"task": "sciq", "rank": 4}),
        ("idp", {"pool": 2, "data": "ptb"}),
        ("cpet", {"task": "sciq"}),
        ("soft-prompt", {"tokens": 4}),
        ("hard-prompt", {"text": "be exact"}),
    ],
)
@needs_packs
def test_a_recover_step_takes_every_method_and_its_keys(method, extra):
    raw = {
        "name": "t",
        "model": "smollm2-135m",
        "evaluate": {"tasks": ["ppl:ptb"]},
        "compress": [{"name": "s", "method": "magnitude", "sparsity": 0.5}],
        "recover": [{"name": "r", "method": method, "base": "s", **extra}],
    }
    r = validate(raw)
    assert r.recover[0]["method"] == method and all(r.recover[0][k] == v for k, v in extra.items())
    wrong = dict(raw, recover=[{"name": "r", "method": method, "base": "s", "pol": 2}])
    with pytest.raises(Exception, match="pol"):
        validate(wrong)


def test_dry_run_loads_no_model(tmp_path, monkeypatch, capsys):
    import recoup.artifact
    import recoup.model.load

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(recoup.artifact, "load_model", boom)
    monkeypatch.setattr(recoup.model.load, "load_pretrained", boom)
    path = tiny_recipe(tmp_path)
    assert main(["run", str(path), "--dry-run", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "recover:prompt" in out and "eval:s60+prompt" in out
    assert not (tmp_path / "run").exists()
    raw = yaml.safe_load(path.read_text())
    raw["recover"][0]["method"] = "soft-promt"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "did you mean 'soft-prompt'" in capsys.readouterr().err


def test_lora_step_in_a_recipe_runs_and_changes_the_numbers(tmp_path):
    from recoup.runs.run import run_recipe
    from recoup.runs.store import Store

    raw = yaml.safe_load(tiny_recipe(tmp_path).read_text())
    corpus = raw["calibration"]["corpus"]
    raw["recover"] = [
        {
            "name": "lora",
            "method": "lora",
            "base": "8x",
            "data": corpus,
            "rank": 4,
            "steps": 4,
            "seqlen": 32,
            "batch_size": 2,
            "lr": 0.01,
        }
    ]
    (tmp_path / "l.yaml").write_text(yaml.safe_dump(raw))
    with Store(tmp_path / "s.sqlite") as store:
        out = run_recipe(load_recipe(tmp_path / "l.yaml"), tmp_path / "run", store, report=False)
        vals = {r["stage"]: r["value"] for r in store.metrics(out.run_id) if r["metric"] == "ppl"}
    assert vals["eval:8x+lora"] != vals["eval:8x"] and vals["eval:8x+lora"] < vals["eval:8x"]


def test_export_step_in_a_recipe_writes_what_transformers_loads(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from recoup.artifact import load_model
    from recoup.runs.run import run_recipe
    from recoup.runs.store import Store

    raw = yaml.safe_load(tiny_recipe(tmp_path).read_text())
    raw["recover"] = []
    raw["evaluate"]["dense"] = False
    raw["compress"] = raw["compress"][:1]
    raw["export"] = [{"name": "hf", "base": "8x", "format": "hf", "dtype": "float32"}]
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(Exception, match="not a compression step"):
        validate({**raw, "export": [{"name": "hf", "base": "9x", "format": "hf"}]})
    with Store(tmp_path / "s.sqlite") as store:
        out = run_recipe(load_recipe(tmp_path / "e.yaml"), tmp_path / "run", store, report=False)
        arts = {a["kind"]: a["path"] for a in store.artifacts(out.run_id)}
    assert "export:hf" in out.ran
    ids = torch.tensor([[5, 17, 23, 40, 41, 8]])
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(arts["export"]).eval()(ids).logits
        ours = load_model(arts["artifact"]).model(ids).logits
    assert torch.allclose(theirs, ours, atol=1e-5)

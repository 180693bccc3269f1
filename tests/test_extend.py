"""Extending recoup: a recovery method, a compression method and a task defined HERE (no other file
touched) are usable from the CLI, a recipe, compare-recovery (the recovery) and Python."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import needs_packs, save_tiny
from test_run import write_corpus

from recoup.cli import main
from recoup.config import Config, check
from recoup.model.recovery import RECOVERY_RECORD, Recovery

# ------------------------------------------------------------------------------------------- a recovery


pytestmark = needs_packs


@dataclasses.dataclass
class RepeatConfig(Config):
    """Toy recovery: prefix the embedding of one token, ``times`` times."""

    token: str = "e"
    times: int = 3

    def __post_init__(self) -> None:
        check(self.times >= 1, f"times must be >= 1 (got {self.times})")


class RepeatPrompt(Recovery):
    method = "repeat-token"

    def __init__(self, token_id: int, times: int) -> None:
        self.token_id, self.times = token_id, times

    def prefix(self, model, input_ids, attention_mask):
        emb = model.get_input_embeddings()
        return emb(torch.full((self.times,), self.token_id, device=emb.weight.device))

    def num_parameters(self) -> int:
        return 0

    def save(self, path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / RECOVERY_RECORD).write_text(
            json.dumps({"method": self.method, "token_id": self.token_id, "times": self.times})
        )

    @classmethod
    def load(cls, path) -> "RepeatPrompt":
        d = json.loads((Path(path) / RECOVERY_RECORD).read_text())
        return cls(d["token_id"], d["times"])


def fit_repeat(loaded, config: RepeatConfig, data):
    ids = loaded.tokenizer(config.token, add_special_tokens=False).input_ids
    return RepeatPrompt(ids[0], config.times), None


# ------------------------------------------------------------------------------------------- a compression


def keep_left(weight, stats, config):
    """Toy pruning: zero the right-most ``sparsity`` share of each row's columns (or the left-most)."""
    from recoup.compress.methods.base import LinearResult

    cols = weight.shape[1]
    cut = int(round(cols * (1 - config.sparsity)))
    mask = torch.zeros_like(weight, dtype=torch.bool)
    if config.options.keep_left:
        mask[:, cut:] = True
    else:
        mask[:, : cols - cut] = True
    return LinearResult(weight=weight.masked_fill(mask, 0), mask=mask)


# ------------------------------------------------------------------------------------------- a task


def run_echo(name, loaded, settings, recovery):
    from recoup.evaluate.tasks.common import make_scorer

    ((ll, _),) = make_scorer(loaded, settings, recovery).loglikelihood([("the market", " rose")])
    return {"ll": ll, "n": 1, "primary": "ll"}


@pytest.fixture
def extended():
    from recoup.compress import METHODS
    from recoup.compress.config import MethodOptions
    from recoup.compress.methods.base import Method
    from recoup.evaluate.tasks import TASKS
    from recoup.evaluate.tasks.common import TaskSpec
    from recoup.recover.base import RecoveryMethod
    from recoup.recover.methods import RECOVERIES

    @dataclasses.dataclass
    class KeepLeftOptions(MethodOptions):
        keep_left: bool = True

    RECOVERIES.register(
        "repeat-token", RecoveryMethod("repeat-token", "toy", RepeatConfig, fit_repeat, RepeatPrompt.load)
    )
    METHODS.register("keep-left", Method("keep-left", "none", keep_left, prune="required", options=KeepLeftOptions))
    TASKS.register("echo", TaskSpec("echo", "toy", run_echo, "a fixed sentence"))
    yield
    RECOVERIES.unregister("repeat-token")
    METHODS.unregister("keep-left")
    TASKS.unregister("echo")


def test_toy_methods_and_task_through_cli_python_compare_and_recipe(extended, tmp_path, capsys):
    from recoup.recipe import load_recipe
    from recoup.recipe.jobs import CompressJob, EvalJob, RecoverJob
    from recoup.runs import stages
    from recoup.runs.run import run_recipe
    from recoup.runs.store import Store

    model = tmp_path / "m"
    save_tiny(model)
    corpus = write_corpus(tmp_path / "c.txt")
    art, rec = tmp_path / "art", tmp_path / "rec"
    # CLI: the toy compression with its own flag, the toy recovery with its own flag, the toy task
    assert (
        main(
            ["compress", str(model), "--method", "keep-left", "--sparsity", "0.5", "--no-keep-left", "--out", str(art)]
        )
        == 0
    )
    w = json.loads((art / "recoup.json").read_text())
    assert w["recipe"]["method"] == "keep-left" and w["recipe"]["keep_left"] is False
    assert (
        main(
            [
                "compress",
                str(model),
                "--method",
                "wanda",
                "--sparsity",
                "0.5",
                "--keep-left",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "option of keep-left" in capsys.readouterr().err
    assert main(["recover", str(art), "--method", "repeat-token", "--times", "2", "--out", str(rec)]) == 0
    assert main(["eval", str(art), "--tasks", "echo", "--json", str(tmp_path / "plain.json")]) == 0
    assert main(["eval", str(art), "--tasks", "echo", "--recovery", str(rec), "--json", str(tmp_path / "r.json")]) == 0
    plain = json.loads((tmp_path / "plain.json").read_text())["results"]["echo"]["ll"]
    with_rec = json.loads((tmp_path / "r.json").read_text())["results"]["echo"]["ll"]
    assert with_rec != plain  # the toy prefix reaches the Scorer

    # Python: the same stage functions with the typed jobs
    job = CompressJob.from_flat(
        {"model": str(model), "method": "keep-left", "sparsity": 0.25, "out": str(tmp_path / "art2")}
    )
    report = stages.compress(job)["report"]
    assert report["sparsity"] == pytest.approx(0.25, abs=0.02)
    stages.recover(
        RecoverJob.from_flat({"model": str(art), "method": "repeat-token", "times": 2, "out": str(tmp_path / "rec2")})
    )
    again = stages.evaluate(EvalJob.from_flat({"model": str(art), "tasks": "echo", "recovery": str(tmp_path / "rec2")}))
    assert again["results"]["echo"]["ll"] == pytest.approx(with_rec, abs=1e-5)

    # compare-recovery: any registered method attaches with --recovery
    assert (
        main(
            [
                "compare-recovery",
                "--task",
                "sciq",
                "--compressed",
                str(art),
                "--recovery",
                str(rec),
                "--limit",
                "2",
                "--prompt-len",
                "8",
                "--new-tokens",
                "2",
                "--repeats",
                "1",
                "--json",
                str(tmp_path / "cmp.json"),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "cmp.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["compressed", "+repeat-token"] and rows[1]["extra_parameters"] == 0

    # a recipe: the toy compression step, the toy recovery step, the toy task
    recipe = {
        "name": "toy",
        "model": str(model),
        "calibration": {"corpus": str(corpus), "nsamples": 2, "seqlen": 32},
        "evaluate": {"tasks": ["echo", f"ppl:{corpus}"], "limit": 2, "seqlen": 32},
        "compress": [{"name": "left", "method": "keep-left", "sparsity": 0.5, "keep_left": False}],
        "recover": [{"name": "rep", "method": "repeat-token", "base": "left", "times": 2}],
    }
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(recipe))
    with Store(tmp_path / "s.sqlite") as store:
        out = run_recipe(load_recipe(tmp_path / "toy.yaml"), tmp_path / "run", store, report=False)
        rows = {(r["stage"], r["task"], r["metric"]): r["value"] for r in store.metrics(out.run_id)}
    assert rows[("eval:left", "echo", "ll")] == pytest.approx(plain, abs=1e-5)
    assert rows[("eval:left+rep", "echo", "ll")] == pytest.approx(with_rec, abs=1e-5)

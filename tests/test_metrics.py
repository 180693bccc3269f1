"""Metrics: SQuAD normalization/EM/F1, LLM-KICK's answer-in-generation EM, ROUGE, stderr, matching."""

from __future__ import annotations

import json
import math

import pytest

from recoup.evaluate import metrics as M


def test_normalize_and_exact_match():
    assert M.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert M.exact_match("the Paris.", ["paris", "London"]) == 1.0
    assert M.exact_match("Paris, France", ["paris"]) == 0.0


def test_contains_answer_needs_word_boundaries():
    assert M.contains_answer("I think it is Paris, the capital.", ["paris"]) == 1.0
    assert M.contains_answer("Comparison of cities", ["paris"]) == 0.0  # 'paris' inside a word does not count
    assert M.contains_answer("no idea", ["Sunset Blvd", "Sunset Boulevard"]) == 0.0
    assert M.contains_answer("anything", [""]) == 0.0  # an empty alias never matches


def test_token_f1_known_values():
    assert M.token_f1("new york city", ["new york"]) == pytest.approx(0.8)
    assert M.token_f1("", [""]) == 1.0
    assert M.token_f1("abc", ["xyz", "abc def"]) == pytest.approx(2 / 3)


def test_rouge_known_values():
    assert M.rouge_n("the cat sat", "the cat sat", 1) == 1.0
    assert M.rouge_n("the cat", "the dog", 2) == 0.0
    # LCS of (a b c d) and (a c d e) is a c d: P = R = 3/4
    assert M.rouge_l("a b c d", "a c d e") == pytest.approx(0.75)


def test_rouge_agrees_with_rouge_score():
    rouge_score = pytest.importorskip("rouge_score.rouge_scorer")
    ref = rouge_score.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    pairs = [
        ("The police arrested two men on Friday.", "Two men were arrested by police on Friday night."),
        ("A landslide buried 83 workers in Tibet", "83 workers were buried by a landslide in Tibet, Xinhua said"),
        ("completely unrelated words", "nothing in common here at all"),
        ("x", "x y z x"),
    ]
    for pred, gold in pairs:
        ours = M.rouge(pred, gold)
        theirs = ref.score(gold, pred)
        for key in ("rouge1", "rouge2", "rougeL"):
            assert ours[key] == pytest.approx(theirs[key].fmeasure, abs=1e-9)


def test_stemmed_rouge_is_rouge_scores_stemmed_lsum():
    pytest.importorskip("rouge_score")
    # Porter stemming: cats -> cat, running/runs -> run; without it nothing matches
    assert M.rouge_stemmed("cats running", "cat runs")["rouge1"] == pytest.approx(1.0)
    assert M.rouge("cats running", "cat runs")["rouge1"] == 0.0
    # sentences swapped: one LCS over the whole text keeps 2 of 4 tokens (L = 0.5); Lsum takes the union LCS
    # of each reference line with every predicted line, so every token counts (Lsum = 1.0)
    got = M.rouge_stemmed("a b\nc d", "c d\na b")
    assert got["rougeL"] == pytest.approx(0.5) and got["rougeLsum"] == pytest.approx(1.0)
    # Lin (2004)'s summary-level LCS: reference line "w1 w2 w3 w4 w5", predicted lines "w1 w2 w6 w7 w8" and
    # "w1 w3 w8 w9 w5": union LCS = w1 w2 w3 w5 -> R = 4/5, P = 4/10
    got = M.rouge_stemmed("w1 w2 w6 w7 w8\nw1 w3 w8 w9 w5", "w1 w2 w3 w4 w5")
    assert got["rougeLsum"] == pytest.approx(2 * 0.8 * 0.4 / 1.2)


def test_stemmed_rouge_option_on_a_summary_task(tmp_path):
    pytest.importorskip("rouge_score")
    from helpers import tiny_loaded

    from recoup.errors import RecoupError
    from recoup.evaluate.runner import EvalSettings
    from recoup.evaluate.tasks import summarization, validate

    stories = tmp_path / "stories.jsonl"
    text = (
        "Summarize the given story.\n\nThe cat sat on the mat. It rained.\n@highlight\nCat sat\n@highlight\nIt rained"
    )
    stories.write_text(json.dumps({"question_id": 1, "text": text, "category": "small"}) + "\n")
    with pytest.raises(RecoupError, match="option rouge must be plain or stemmed"):
        validate(["cnndm"], {"cnndm_file": str(stories), "rouge": "lsum"})
    assert summarization.load("cnndm", {"cnndm_file": str(stories)})[0]["reference_lines"] == "Cat sat\nIt rained"
    options = {"cnndm_file": str(stories), "max_new_tokens": "6", "rouge": "stemmed", "chat": "false"}
    res = summarization.run("cnndm", tiny_loaded("llama"), EvalSettings(seqlen=512, options=options), None)
    gen = res["examples"][0]["generated"].strip()
    assert res["rougeLsum"] == pytest.approx(M.rouge_stemmed(gen, "Cat sat\nIt rained")["rougeLsum"])
    assert res["protocol"]["rouge"] == "stemmed" and "use_stemmer=True" in res["protocol"]["metric"]


def test_stderr_is_sample_sd_over_sqrt_n():
    vals = [1.0, 0.0, 1.0, 1.0]
    p = 0.75
    assert M.stderr(vals) == pytest.approx(math.sqrt(p * (1 - p) * 4 / 3 / 4))
    assert math.isnan(M.stderr([1.0]))


def test_argmax_first_of_ties():
    assert M.argmax([1.0, 3.0, 3.0]) == 1


def test_matching_is_within_five_percent_of_dense():
    assert M.matching(0.60, 0.571)  # -4.8%
    assert not M.matching(0.60, 0.569)  # -5.2%
    assert M.matching(0.60, 0.70)  # better than dense matches
    assert M.matching(20.0, 20.9, higher_is_better=False)  # perplexity +4.5%
    assert not M.matching(20.0, 21.2, higher_is_better=False)

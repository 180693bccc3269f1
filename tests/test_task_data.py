import json

import pytest
import torch
from helpers import needs_packs, tiny_tokenizer

from recoup import RecoupError
from recoup.recover.task_data import (
    MCExample,
    batch_stream,
    collate,
    completion_sequence,
    jsonl_sequences,
    load_task_examples,
    split_task,
    tuning_data,
)


def _examples(n=200):
    return [
        MCExample(
            key=f"q{i}",
            contexts=(f"Question {i}\nAnswer:",) * 2,
            continuations=(" a", " b"),
            choices=("a", "b"),
            gold=i % 2,
        )
        for i in range(n)
    ]


@needs_packs
def test_split_is_disjoint_complete_and_seeded():
    exs = _examples(400)
    a = split_task("sciq", 0.3, seed=0, examples=exs)
    b = split_task("sciq", 0.3, seed=0, examples=exs)
    c = split_task("sciq", 0.3, seed=1, examples=exs)
    keys_train, keys_held = {e.key for e in a.train}, {e.key for e in a.heldout}
    assert not keys_train & keys_held
    assert keys_train | keys_held == {e.key for e in exs}
    assert 0.2 < len(a.heldout) / 400 < 0.4
    assert [e.key for e in a.heldout] == [e.key for e in b.heldout]
    assert [e.key for e in a.heldout] != [e.key for e in c.heldout]


@needs_packs
def test_split_depends_on_the_example_not_its_position():
    exs = _examples(300)
    a = split_task("sciq", 0.3, seed=0, examples=exs)
    b = split_task("sciq", 0.3, seed=0, examples=list(reversed(exs)) + [MCExample("new", ("x",), (" y",), ("y",), 0)])
    assert {e.key for e in a.heldout} <= {e.key for e in b.heldout}


def test_bad_fraction_and_unknown_task_are_clear():
    with pytest.raises(RecoupError, match="heldout-fraction"):
        split_task("sciq", 1.5, examples=_examples())
    with pytest.raises(RecoupError, match="did you mean 'sciq'"):
        load_task_examples("scqi")


@needs_packs
def test_sciq_from_pack_has_gold_correct_answer():
    exs = load_task_examples("sciq")
    assert len(exs) == 1000
    assert all(len(e.choices) == 4 and e.gold == 3 for e in exs)
    assert all(e.gold_pair[0].endswith("\nAnswer:") and e.gold_pair[1].startswith(" ") for e in exs)
    split = split_task("sciq", 0.3, 0, exs)
    assert len(split.train) + len(split.heldout) == 1000


def test_completion_sequence_scores_only_the_completion_and_cuts_context_from_the_left():
    tok = tiny_tokenizer()
    seq = completion_sequence(tok, "abcdefghij", "XY", max_len=6)
    assert len(seq.ids) == 6
    assert tok.decode(seq.ids) == "ghijXY"
    batch = collate([seq, completion_sequence(tok, "ab", "Z", 8)], tok.pad_token_id)
    assert batch.input_ids.shape == (2, 6)
    assert tok.decode(batch.labels[0][batch.labels[0] != -100]) == "XY"
    assert tok.decode(batch.labels[1][batch.labels[1] != -100]) == "Z"
    assert batch.attention_mask[1].tolist() == [1, 1, 1, 0, 0, 0]


def test_jsonl_both_forms_and_a_bad_line(tmp_path):
    tok = tiny_tokenizer()
    p = tmp_path / "d.jsonl"
    p.write_text(
        json.dumps({"text": "hello world"}) + "\n\n" + json.dumps({"prompt": "Q:", "completion": " yes"}) + "\n"
    )
    seqs = jsonl_sequences(tok, p)
    assert [s.first_scored for s in seqs] == [1, 2]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(RecoupError, match="bad.jsonl:2"):
        jsonl_sequences(tok, bad)


@needs_packs
def test_tuning_data_needs_exactly_one_source_and_keeps_heldout_out_of_training():
    tok = tiny_tokenizer()
    with pytest.raises(RecoupError, match="exactly one"):
        tuning_data(tok)
    data = tuning_data(tok, task="sciq", max_len=64, heldout_fraction=0.3, seed=0)
    held = {tuple(completion_sequence(tok, *e.gold_pair, 64).ids) for e in data.split.heldout}
    used = {tuple(s.ids) for s in data.train + data.valid}
    assert not held & used
    assert data.protocol["n_heldout"] == len(data.split.heldout)


def test_batch_stream_visits_every_sequence_once_per_epoch():
    tok = tiny_tokenizer()
    seqs = [completion_sequence(tok, f"c{i}", f"{i % 10}", 16) for i in range(10)]
    stream = batch_stream(seqs, 3, tok.pad_token_id, seed=0)
    seen = []
    for _ in range(4):  # 3 + 3 + 3 + 1
        b = next(stream)
        seen += [tuple(row[m.bool()].tolist()) for row, m in zip(b.input_ids, b.attention_mask)]
    assert sorted(seen) == sorted(tuple(s.ids) for s in seqs)


def test_loss_on_kept_positions_equals_the_full_loss():
    import torch.nn.functional as F
    from helpers import tiny_model

    from recoup.model.forward import forward_logits
    from recoup.recover.losses import kept_loss, mean_loss, model_outputs

    tok = tiny_tokenizer()
    model = tiny_model("llama")
    seqs = [completion_sequence(tok, "the context " * (i + 1), f" ans{i}", 64) for i in range(3)]
    b = collate(seqs, tok.pad_token_id)
    with torch.no_grad():
        logits = forward_logits(model, b.input_ids, b.attention_mask)  # the full-vocabulary reference
        full = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), b.labels[:, 1:].reshape(-1), ignore_index=-100
        )
        out, keep = model_outputs(model, b, "cpu")
        assert out.logits.shape[1] == len(keep) < b.input_ids.shape[1]
        assert torch.allclose(kept_loss(out.logits, keep, b.labels), full, atol=1e-5)
        assert abs(mean_loss(model, seqs, tok.pad_token_id, batch_size=2) - full.item()) < 1e-4

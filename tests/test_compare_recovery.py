import json

import pytest
import torch
from helpers import needs_packs, save_tiny, tiny_model
from test_lora import toy_data

from recoup import RecoupError
from recoup.cli import main
from recoup.evaluate.latency import LatencyConfig, measure_latency
from recoup.model.forward import forward_logits
from recoup.model.recovery import Recovery
from recoup.recover.adapter import LoraConfig
from recoup.recover.lora import fit_lora
from recoup.recover.train import TrainConfig
from recoup.runs.compare_recovery import Entry, compare


class FixedPrefix(Recovery):
    method = "fixed"

    def __init__(self, prefix):
        self.p = prefix

    def prefix(self, model, input_ids, attention_mask):
        return self.p

    def num_parameters(self):
        return self.p.numel()

    def save(self, path):
        raise NotImplementedError


@pytest.mark.parametrize("with_prefix", [False, True])
def test_cached_decode_in_latency_matches_full_recompute(with_prefix):
    model = tiny_model("llama")
    ids = torch.tensor([[5, 17, 23, 40, 41, 8]])
    rec = FixedPrefix(torch.randn(3, 32)) if with_prefix else None
    lat = measure_latency(model, ids, rec, LatencyConfig(prompt_len=6, new_tokens=5, repeats=1))
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            logits = forward_logits(model, seq, torch.ones_like(seq), rec.p if rec else None)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert lat["generated"] == seq[0, 6:].tolist()
    assert lat["prefill_ms"] > 0 and lat["decode_ms_per_token"] > 0


def compressed_artifact(dense, out, sparsity: float = 0.5):
    """A real recoup artifact of the tiny model in ``dense``: magnitude pruning (no calibration), packed."""
    from recoup.recipe.jobs import CompressJob
    from recoup.runs.stages import compress

    compress(CompressJob.from_flat({"model": str(dense), "out": str(out), "method": "magnitude", "sparsity": sparsity}))
    return out


@needs_packs
def test_compare_rows_and_cli(tmp_path):
    from recoup.artifact import load_model

    save_tiny(tmp_path / "dense")
    art = compressed_artifact(tmp_path / "dense", tmp_path / "art")
    loaded = load_model(str(art))
    rec, _, _ = fit_lora(
        loaded.model, loaded.tokenizer, toy_data(loaded.tokenizer), LoraConfig(rank=4), TrainConfig(steps=2)
    )
    rec.save(tmp_path / "lora")
    lat = LatencyConfig(prompt_len=16, new_tokens=3, repeats=1)
    out = compare(
        [
            Entry("dense", str(tmp_path / "dense")),
            Entry("compressed", str(art)),
            Entry("+LoRA", str(art), str(tmp_path / "lora")),
        ],
        "sciq",
        limit=4,
        latency=lat,
    )
    dense, comp, lora = out["rows"]
    assert dense["extra_parameters"] == comp["extra_parameters"] == 0
    assert lora["extra_parameters"] == rec.num_parameters()
    assert dense["n"] == comp["n"] == lora["n"] == 4 and lora["base_intact_after_apply"] is True
    assert lora["merged"] is False
    assert out["protocol"]["n_heldout"] > 0
    # the compressed rows are the artifact: half its weights zero, its fingerprint unchanged by the adapter
    assert dense["base_sparsity"] < 0.01 and "compression_digest" not in dense
    assert comp["base_sparsity"] == pytest.approx(0.5, abs=0.01) == lora["base_sparsity"]
    assert comp["compression_digest"] == lora["compression_digest"] == lora["compression_digest_after"]
    code = main(
        [
            "compare-recovery",
            "--task",
            "sciq",
            "--dense",
            str(tmp_path / "dense"),
            "--compressed",
            str(art),
            "--recovery",
            str(tmp_path / "lora"),
            "--limit",
            "2",
            "--prompt-len",
            "8",
            "--new-tokens",
            "2",
            "--repeats",
            "1",
            "--json",
            str(tmp_path / "c.json"),
        ]
    )
    assert code == 0
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["dense", "compressed", "+lora"]
    assert main(["compare-recovery", "--task", "sciq", "--recovery", str(tmp_path / "lora")]) == 2
    with pytest.raises(RecoupError, match="duplicate"):
        compare([Entry("a", "x"), Entry("a", "y")], "sciq")


@needs_packs
def test_recover_cli_lora_then_cpet_with_inheritance(tmp_path):
    from recoup.recover.adapter import LoraRecovery
    from recoup.recover.cpet import CpetRecovery
    from recoup.recover.methods import load_recovery

    save_tiny(tmp_path / "dense")
    compressed_artifact(tmp_path / "dense", tmp_path / "small")
    common = ["--task", "sciq", "--steps", "2", "--seqlen", "48", "--batch-size", "2", "--rank", "4"]
    assert main(["recover", str(tmp_path / "dense"), "--method", "lora", "--out", str(tmp_path / "lora")] + common) == 0
    assert (
        main(
            [
                "recover",
                str(tmp_path / "small"),
                "--method",
                "cpet",
                "--out",
                str(tmp_path / "cpet"),
                "--inherit",
                str(tmp_path / "lora"),
                "--recovery-modules",
                "--recovery-rank",
                "2",
                "--distill",
                "--teacher",
                str(tmp_path / "dense"),
            ]
            + common
        )
        == 0
    )
    assert isinstance(load_recovery(tmp_path / "lora"), LoraRecovery)
    cpet = load_recovery(tmp_path / "cpet")
    assert isinstance(cpet, CpetRecovery) and len(cpet.modules) > 0
    assert cpet.meta["init"] == "inherited" and cpet.meta["data"]["task"] == "sciq"
    assert cpet.meta["compression_fingerprint"]["unchanged"] is True  # trained on the artifact, left as it was
    # distillation without a teacher LoRA is one clear line, exit 2
    assert (
        main(
            ["recover", str(tmp_path / "small"), "--method", "cpet", "--out", str(tmp_path / "bad"), "--distill"]
            + common
        )
        == 2
    )


def test_merge_keeps_rows_only_for_the_same_protocol():
    from recoup.runs.compare_recovery import merge

    proto = {"task": "sciq", "heldout_fraction": 0.3, "seed": 0, "n_heldout": 300, "scored": "held-out part"}
    a = {"rows": [{"label": "dense"}], "protocol": proto}
    b = {"rows": [{"label": "compressed"}], "protocol": dict(proto)}
    assert [r["label"] for r in merge(a, b)["rows"]] == ["dense", "compressed"]
    with pytest.raises(RecoupError, match="seed"):
        merge(a, {"rows": [{"label": "x"}], "protocol": {**proto, "seed": 1}})
    with pytest.raises(RecoupError, match="duplicate"):
        merge(a, {"rows": [{"label": "dense"}], "protocol": proto})


def test_compare_recovery_rows_take_labels_and_can_skip_the_compressed_row():
    import argparse

    from recoup.commands.compare_recovery import entries, register

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    parser = sub.choices["compare-recovery"]

    def rows(*argv):
        return [(e.label, e.recovery) for e in entries(parser.parse_args(["--task", "sciq", *argv]))]

    assert rows("--compressed", "art", "--recovery", "ptb=/p/a", "--recovery", "sciq=/p/b") == [
        ("compressed", None),
        ("+ptb", "/p/a"),
        ("+sciq", "/p/b"),
    ]
    with pytest.raises(RecoupError, match="no recovery directory"):  # no label: the row is named after its method
        rows("--compressed", "art", "--recovery", "/x/a=b", "--skip-compressed-row")
    with pytest.raises(RecoupError, match="labelled"):
        rows("--compressed", "art", "--recovery", "a=/p/a", "--recovery", "a=/p/b")
    with pytest.raises(RecoupError, match="needs --compressed"):
        rows("--dense", "d", "--skip-compressed-row")

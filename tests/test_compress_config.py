"""CompressConfig validation and the `recoup compress` command on a tiny saved model."""

from __future__ import annotations

import json

import pytest
from helpers import save_tiny

from recoup.artifact import load_model
from recoup.artifact.fingerprint import compression_fingerprint
from recoup.cli import main
from recoup.compress import CompressConfig
from recoup.compress.masks import is_nm
from recoup.errors import RecoupError
from recoup.model.anatomy import anatomy


@pytest.mark.parametrize(
    "data,match",
    [
        ({"method": "sparsgpt", "sparsity": 0.5}, "did you mean 'sparsegpt'"),
        ({"method": "sparsegpt", "sparsty": 0.5}, "unknown key 'sparsty'.*did you mean 'sparsity'"),
        ({"method": "sparsegpt", "pattern": "2:4", "sparsity": 0.3}, "2:4 means 50% sparsity"),
        ({"method": "wanda", "pattern": "4:2"}, "1 <= N < M"),
        ({"method": "wanda", "pattern": "two:four"}, "not of the form N:M"),
        ({"method": "gptq", "bits": 3.5}, "whole number from 2 to 8"),
        ({"method": "rtn", "bits": 1}, "whole number from 2 to 8"),
        ({"method": "magnitude", "sparsity": 1.0}, r"\[0, 0.99\]"),
        ({"method": "magnitude"}, "give a sparsity"),
        ({"method": "gptq"}, "give bits"),
        ({"method": "wanda", "sparsity": 0.5, "bits": 4}, "joint sparse"),
        ({"method": "gptq", "bits": 4, "sparsity": 0.5}, "does not prune"),
        ({"method": "rtn", "bits": 4, "act_order": True}, "option of gptq, not of rtn"),
        ({"method": "sparsegpt", "pattern": "4:8", "blocksize": 12}, "multiple of M=8"),
        ({"method": "rtn", "bits": 4, "targets": "mpl"}, "did you mean 'mlp'"),
    ],
)
def test_bad_configs_give_one_clear_line(data, match):
    with pytest.raises(RecoupError, match=match):
        CompressConfig.from_dict(data)


def test_good_configs():
    c = CompressConfig.from_dict({"method": "sparsegpt", "pattern": "2:4"})
    assert c.sparsity == 0.5 and c.nm == (2, 4)
    assert CompressConfig.from_dict({"method": "gptq", "bits": 4, "group_size": -1}).group_size is None
    j = CompressConfig.from_dict({"method": "sparsegpt", "sparsity": 0.5, "bits": 4, "group_size": 64})
    assert j.prunes and j.quantizes and j.describe() == "sparsegpt 50% 4-bit sym g64"


def test_gptq_defaults_are_the_fields():
    """act-order with static groups on by default (llm-compressor's actorder="static"); per-row is allowed too."""
    g = CompressConfig.from_dict({"method": "gptq", "bits": 4, "group_size": 64})
    assert g.options.act_order and g.options.static_groups
    assert (g.options.blocksize, g.options.percdamp) == (128, 0.01)
    assert CompressConfig.from_dict({"method": "gptq", "bits": 4}).options.static_groups  # no effect per-row
    off = CompressConfig.from_dict({"method": "gptq", "bits": 4, "act_order": False, "static_groups": False})
    assert not off.options.act_order


def test_cli_compress_writes_a_loadable_artifact(tmp_path, capsys):
    src = tmp_path / "tiny"
    save_tiny(src, "llama", hidden=32, layers=2)
    corpus = tmp_path / "calib.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "art"
    rc = main(
        [
            "compress",
            str(src),
            "--method",
            "sparsegpt",
            "--pattern",
            "2:4",
            "--bits",
            "4",
            "--group-size",
            "16",
            "--calib",
            str(corpus),
            "--nsamples",
            "4",
            "--seqlen",
            "64",
            "--out",
            str(out),
        ]
    )
    assert rc == 0 and "wrote" in capsys.readouterr().out
    manifest = json.loads((out / "recoup.json").read_text())
    assert manifest["calibration"]["nsamples"] == 4 and manifest["source"]["sha256"]
    assert manifest["recipe"]["pattern"] == "2:4" and len(manifest["layers"]) == 14
    lm = load_model(str(out))
    for _, mod in anatomy(lm.model).iter_linears():
        assert is_nm(mod.weight, 2, 4)
    assert compression_fingerprint(lm.model, lm.manifest)["all_on_grid"] is True
    rc = main(["eval", str(out), "--tasks", f"ppl:{corpus}", "--seqlen", "64", "--limit", "2"])
    assert rc == 0


def test_cli_errors_exit_2(tmp_path, capsys):
    assert (
        main(["compress", str(tmp_path / "nope"), "--method", "rtn", "--bits", "4", "--out", str(tmp_path / "o")]) == 2
    )
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["compress", "x", "--method", "sparsgpt", "--out", str(tmp_path / "o")]) == 2
    assert "did you mean 'sparsegpt'" in capsys.readouterr().err

"""Recovery inside the artifact (``recover --method tune``): scales / sparse weights / norms train with codes and
masks frozen, the result is a new artifact (bit-identical codes and masks, a tuning record) that evaluates and
exports like any other; refused choices are one line, exit 2; the squarehead objective (Kurtic et al. 2023)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import save_tiny, tiny_model
from safetensors.torch import load_file
from test_run import write_corpus

from recoup.artifact import load_model
from recoup.artifact.fingerprint import compression_fingerprint
from recoup.artifact.packing import PACKED_FILE
from recoup.artifact.store import QPARAMS_FILE, load_artifact, load_qparams, read_manifest
from recoup.cli import main
from recoup.data.windows import corpus_ids
from recoup.errors import RecoupError
from recoup.model.anatomy import anatomy
from recoup.recover.losses import Objective, layer_outputs, mean_loss, squarehead_loss
from recoup.recover.task_data import Sequence, collate, tuning_data
from recoup.recover.tune import TuneConfig, fit_tune

SEQLEN = 48


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny dense llama, a text corpus, and two artifacts of it: 50% sparse + 4-bit (g32), and 50% sparse only."""
    tmp = tmp_path_factory.mktemp("tune")
    dense = tmp / "dense"
    save_tiny(dense, "llama", hidden=64, layers=2)
    corpus = str(write_corpus(tmp / "text.txt", n_words=3000))
    common = ["--calib", corpus, "--nsamples", "4", "--seqlen", str(SEQLEN), "--device", "cpu"]
    assert (
        main(
            [
                "compress",
                str(dense),
                "--method",
                "sparsegpt",
                "--sparsity",
                "0.5",
                "--bits",
                "4",
                "--group-size",
                "32",
                "--out",
                str(tmp / "quant"),
                *common,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "compress",
                str(dense),
                "--method",
                "sparsegpt",
                "--sparsity",
                "0.5",
                "--out",
                str(tmp / "sparse"),
                *common,
            ]
        )
        == 0
    )
    return {"tmp": tmp, "dense": dense, "corpus": corpus, "quant": tmp / "quant", "sparse": tmp / "sparse"}


def _windows(ids: torch.Tensor, n: int) -> list[Sequence]:
    return [Sequence(ids=ids[i * SEQLEN : (i + 1) * SEQLEN].tolist()) for i in range(n)]


def _tune(work, artifact, **cfg):
    """Tune ``artifact`` in Python; returns (tuned, losses before, losses after) on fixed training windows and on
    held-out windows of the corpus' test split (never trained or validated on)."""
    loaded = load_artifact(work[artifact])
    tok = loaded.tokenizer
    config = TuneConfig(data=work["corpus"], seqlen=SEQLEN, val_windows=2, seed=0, **cfg)
    data = tuning_data(tok, data=work["corpus"], max_len=SEQLEN, seed=0, val_windows=2)
    train_set = _windows(data.lm_ids, 8)
    held_out = _windows(corpus_ids(tok, work["corpus"], "test"), 8)

    def losses():
        return mean_loss(loaded.model, train_set, tok.pad_token_id), mean_loss(loaded.model, held_out, tok.pad_token_id)

    before = losses()
    tuned, result = fit_tune(loaded, config, data)
    return tuned, before, losses(), result


def _packed(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / PACKED_FILE))


def test_scales_lower_train_and_held_out_loss_codes_and_masks_bit_identical(work):
    src = read_manifest(work["quant"])
    tuned, before, after, result = _tune(work, "quant", trainable="scales", steps=30, lr=2e-2, batch_size=4)
    assert after[0] < before[0] - 0.02 and after[1] < before[1] - 0.02, (before, after)
    out = work["tmp"] / "quant-tuned"
    tuned.save(out)
    new = read_manifest(out)
    # the integer codes and the masks: the same packed bytes, a different grid
    old_t, new_t = _packed(work["quant"]), _packed(out)
    assert old_t.keys() == new_t.keys() and all(torch.equal(old_t[k], new_t[k]) for k in old_t)
    old_q, new_q = load_qparams(work["quant"]), load_qparams(out)
    assert any(not torch.equal(old_q[n]["scale"], new_q[n]["scale"]) for n in old_q)
    assert all(torch.equal(old_q[n]["zero"], new_q[n]["zero"]) for n in old_q)  # zero points frozen
    assert new["storage"]["tensors"] == src["storage"]["tensors"]
    # the compression record is kept; the tuning record says what, on what, how
    for key in ("recipe", "layers", "calibration", "source", "summary"):
        assert new[key] == src[key]
    rec = new["tuning"][-1]
    assert rec["trainable"] == ["scales"] and rec["objective"] == "lm" and rec["teacher"] is None
    assert rec["tuned"]["scales"] == len(src["layers"]) and rec["trained_parameters"] > 0
    assert rec["data"]["corpus"] == work["corpus"] and rec["compression_fingerprint"]["unchanged"]
    assert rec["source_artifact"]["manifest_sha256"] == src["manifest_sha256"]
    # the saved artifact computes what the tuned model computed, and its fingerprint is the source's
    reloaded = load_artifact(out)
    x = torch.randint(4, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded.model(x).logits, tuned.loaded.model(x).logits)
    source = load_artifact(work["quant"])
    src_fp = compression_fingerprint(source.model, source.manifest)
    assert all(e["codes_sha256"] for e in src_fp["linears"].values())
    assert compression_fingerprint(reloaded.model, reloaded.manifest)["digest"] == src_fp["digest"]


def test_masked_weights_and_norms_lower_loss_pruned_weights_stay_zero(work):
    src = load_artifact(work["sparse"])
    masks = {n: anatomy(src.model).weight_matrix(m) == 0 for n, m in anatomy(src.model).iter_linears()}
    tuned, before, after, _ = _tune(work, "sparse", trainable="weights,norms", steps=30, lr=3e-3, batch_size=4)
    assert after[0] < before[0] - 0.02 and after[1] < before[1] - 0.02, (before, after)
    model = tuned.loaded.model
    changed = 0
    for name, mod in anatomy(model).iter_linears():
        w = anatomy(model).weight_matrix(mod)
        assert torch.equal(w == 0, masks[name])  # every pruned weight exactly zero, every kept one non-zero
        changed += int(not torch.equal(w, anatomy(src.model).weight_matrix(dict(src.model.named_modules())[name])))
    assert changed == len(masks)
    norm = model.model.norm.weight
    assert not torch.equal(norm, src.model.model.norm.weight)
    out = work["tmp"] / "sparse-tuned"
    tuned.save(out)
    old_t, new_t = _packed(work["sparse"]), _packed(out)
    assert all(torch.equal(old_t[k], new_t[k]) for k in old_t if k.endswith(".mask"))
    assert read_manifest(out)["tuning"][-1]["tuned"] == {"scales": 0, "weights": len(masks), "norms": 5}
    assert not (out / QPARAMS_FILE).exists()


def test_a_narrower_dtype_than_the_artifact_is_refused(work):
    loaded = load_artifact(work["quant"], dtype="bfloat16")
    with pytest.raises(
        RecoupError,
        match=r"\(bfloat16\), which would round its untouched weights; load it with "
        r"--dtype float32$",
    ):
        fit_tune(loaded, TuneConfig(data=work["corpus"], seqlen=SEQLEN), None)


def test_save_refuses_changed_codes(work):
    tuned, *_ = _tune(work, "quant", trainable="norms", steps=1, eval_every=1)
    name = tuned.fields["layers"][0]["name"]
    mod = dict(tuned.loaded.model.named_modules())[name]
    with torch.no_grad():
        mod.weight[0, :4] = mod.weight[0, :4] * 3 + 0.5  # moved off its codes
    with pytest.raises(RecoupError, match="refusing to save: tuning changed the codes or mask of 1 linears"):
        tuned.save(work["tmp"] / "never")
    assert not (work["tmp"] / "never").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["quant", "weights"], "--trainable weights would move the 4-bit weights"),
        (["quant", "scales,weights"], "--trainable weights would move the 4-bit weights"),
        (["sparse", "scales"], "is not quantized: it has no scales to tune"),
        (["dense", "norms"], "tune trains inside a recoup artifact"),
        (["quant", "codes"], "--trainable takes a comma list of scales, norms, weights"),
    ],
)
def test_refused_choices_are_one_line_exit_2(work, capsys, args, message):
    source, trainable = args
    code = main(
        [
            "recover",
            str(work[source]),
            "--method",
            "tune",
            "--trainable",
            trainable,
            "--data",
            work["corpus"],
            "--out",
            str(work["tmp"] / "refused"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (work["tmp"] / "refused").exists()


def test_refused_out_is_the_source(work, capsys):
    code = main(
        [
            "recover",
            str(work["quant"]),
            "--method",
            "tune",
            "--data",
            work["corpus"],
            "--force",
            "--out",
            str(work["quant"]),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--out is the source artifact" in err and len(err.splitlines()) == 1


def test_cli_tune_kd_squarehead_then_eval_and_export_compressed_tensors(work, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "tuned"
    assert (
        main(
            [
                "recover",
                str(work["quant"]),
                "--method",
                "tune",
                "--trainable",
                "scales,norms",
                "--objective",
                "kd+squarehead",
                "--data",
                work["corpus"],
                "--seqlen",
                str(SEQLEN),
                "--steps",
                "4",
                "--batch-size",
                "2",
                "--val-windows",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rec = read_manifest(out)["tuning"][-1]
    assert rec["objective"] == "kd+squarehead" and rec["teacher"] == str(work["dense"])
    assert rec["trainable"] == ["scales", "norms"]
    report = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                str(out),
                "--tasks",
                f"ppl:{work['corpus']}",
                "--limit",
                "2",
                "--seqlen",
                str(SEQLEN),
                "--json",
                str(report),
            ]
        )
        == 0
    )
    assert json.loads(report.read_text())["results"][f"ppl:{work['corpus']}"]["ppl"] > 1
    exported = tmp_path / "ct"
    assert main(["export", str(out), "--format", "compressed-tensors", "--out", str(exported)]) == 0
    ours = load_artifact(out).model
    theirs = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    x = torch.randint(4, 100, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = ours(x).logits, theirs(x).logits
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    # the tuned artifact is a model, not an adapter: attaching it is one clear line
    code = main(["eval", str(work["quant"]), "--recovery", str(out), "--tasks", f"ppl:{work['corpus']}"])
    assert code == 2


# ---------------------------------------------------------------------------------------------- block-wise


def _layer_losses(student, teacher, ids) -> list[float]:
    """Each decoder layer's ||y_s - y_t||^2 / ||y_t||^2 on ``ids``, every model on its own stream (full forwards)."""
    with torch.no_grad(), layer_outputs(student) as hs, layer_outputs(teacher) as ht:
        student(ids)
        teacher(ids)
    return [float(squarehead_loss([hs[i]], [ht[i]])) for i in sorted(hs)]


def test_blockwise_alone_lowers_each_layers_loss_and_is_what_the_tuned_model_computes(work):
    """Block-wise with no end-to-end step: every layer's loss falls, and the recorded loss after is the tuned model's
    own layer output against the dense model's on the compression's calibration windows (the two streams)."""
    from recoup.data.calibration import calibration_windows

    tuned, *_ = _tune(work, "quant", trainable="scales,norms", steps=0, blockwise_steps=12, lr=2e-2, batch_size=2)
    bw = tuned.meta["blockwise"]
    assert bw["steps"] == 12 and bw["windows"] == 4 and bw["seqlen"] == SEQLEN and len(bw["layers"]) == 2
    for rec in bw["layers"]:
        assert rec["improved"] and rec["loss_after"] < rec["loss_before"] * 0.95 and rec["parameters"] > 0, rec
    cal = read_manifest(work["quant"])["calibration"]
    assert bw["calibration"] == calibration_windows(tuned.loaded.tokenizer, cal["corpus"], 4, SEQLEN).protocol
    ids = calibration_windows(tuned.loaded.tokenizer, cal["corpus"], cal["nsamples"], cal["seqlen"], cal["seed"])
    dense = load_model(str(work["dense"])).model
    got = _layer_losses(tuned.loaded.model, dense, ids.input_ids)
    assert got == pytest.approx([r["loss_after"] for r in bw["layers"]], rel=1e-4)
    source = _layer_losses(load_artifact(work["quant"]).model, dense, ids.input_ids)
    assert source[0] == pytest.approx(bw["layers"][0]["loss_before"], rel=1e-4)  # layer 0: the same input stream
    assert all(g < s for g, s in zip(got, source)), (got, source)
    assert tuned.meta["train"]["steps"] == 0 and tuned.meta["train"]["best_val_loss"] == bw["val_loss_after"]


def test_blockwise_then_end_to_end_codes_and_masks_bit_identical_recorded_in_the_manifest(work, tmp_path):
    out = tmp_path / "bw"
    args = ["recover", str(work["quant"]), "--method", "tune", "--trainable", "scales,norms"]
    common = ["--data", work["corpus"], "--seqlen", str(SEQLEN), "--batch-size", "2", "--val-windows", "1"]
    assert main([*args, *common, "--steps", "3", "--blockwise-steps", "6", "--lr", "1e-2", "--out", str(out)]) == 0
    old_t, new_t = _packed(work["quant"]), _packed(out)
    assert old_t.keys() == new_t.keys() and all(torch.equal(old_t[k], new_t[k]) for k in old_t)
    old_q, new_q = load_qparams(work["quant"]), load_qparams(out)
    assert all(torch.equal(old_q[n]["zero"], new_q[n]["zero"]) for n in old_q)
    rec = read_manifest(out)["tuning"][-1]
    assert rec["config"]["blockwise_steps"] == 6 and rec["train"]["steps"] == 3
    bw = rec["blockwise"]
    assert bw["steps"] == 6 and bw["teacher"] == str(work["dense"]) and len(bw["layers"]) == 2
    assert all(r["loss_after"] < r["loss_before"] for r in bw["layers"]), bw["layers"]
    assert bw["val_loss_after"] is not None and rec["compression_fingerprint"]["unchanged"]


def test_blockwise_masked_weights_pruned_stay_zero(work):
    src = load_artifact(work["sparse"])
    masks = {n: anatomy(src.model).weight_matrix(m) == 0 for n, m in anatomy(src.model).iter_linears()}
    tuned, *_ = _tune(work, "sparse", trainable="weights", steps=0, blockwise_steps=6, lr=3e-4, batch_size=2)
    assert all(r["loss_after"] < r["loss_before"] for r in tuned.meta["blockwise"]["layers"])
    model = tuned.loaded.model
    for name, mod in anatomy(model).iter_linears():
        assert torch.equal(anatomy(model).weight_matrix(mod) == 0, masks[name])
    tuned.save(work["tmp"] / "sparse-bw")  # the fingerprint check at save passes


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--blockwise-steps", "-1"], "blockwise_steps must be >= 0 (got -1; 0: off)"),
        (["--steps", "0"], "steps must be >= 1 (got 0; 0 only with --blockwise-steps N"),
        (["--blockwise-steps", "2", "--magnitude"], "fits on the compression's calibration windows, and"),
    ],
)
def test_blockwise_refusals_are_one_line_exit_2(work, capsys, extra, message):
    source = work["quant"]
    if "--magnitude" in extra:  # a data-free compression records no calibration windows
        extra = [e for e in extra if e != "--magnitude"]
        source = work["tmp"] / "magnitude"
        if not source.exists():
            assert main(["compress", str(work["dense"]), "--method", "magnitude", "--sparsity", "0.5", "--out",
                         str(source), "--device", "cpu"]) == 0  # fmt: skip
            capsys.readouterr()
        extra = [*extra, "--trainable", "weights"]
    code = main(["recover", str(source), "--method", "tune", "--data", work["corpus"], *extra, "--out",
                 str(work["tmp"] / "refused-bw")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (work["tmp"] / "refused-bw").exists()


# ---------------------------------------------------------------------------------------------- squarehead


def test_squarehead_matches_hand_computation():
    torch.manual_seed(0)
    s = [torch.randn(2, 5, 8) for _ in range(3)]
    t = [torch.randn(2, 5, 8) for _ in range(3)]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    hand = 0.0
    for a, b in zip(s, t):
        num = sum(((a[i, j] - b[i, j]) ** 2).sum() for i in range(2) for j in range(5) if mask[i, j])
        den = sum((b[i, j] ** 2).sum() for i in range(2) for j in range(5) if mask[i, j])
        hand += float(num / den)
    assert float(squarehead_loss(s, t, mask)) == pytest.approx(hand, rel=1e-6)
    assert float(squarehead_loss(t, t, mask)) == 0.0
    with pytest.raises(RecoupError, match="one output per decoder layer"):
        squarehead_loss(s[:2], t)


def test_squarehead_objective_is_zero_for_the_teacher_and_uses_every_layer_output():
    model = tiny_model("llama", hidden=32, layers=3)
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = collate([Sequence(ids=r.tolist()) for r in ids], 0)
    with torch.no_grad():
        assert float(Objective("squarehead", model)(model, batch, "cpu")) == 0.0
    other = tiny_model("llama", hidden=32, layers=3, seed=1)
    with torch.no_grad():
        with layer_outputs(model) as hs, layer_outputs(other) as ht:
            model(ids)
            other(ids)
        hand = float(squarehead_loss([hs[i] for i in range(3)], [ht[i] for i in range(3)]))
        got = float(Objective("squarehead", other)(model, batch, "cpu"))
        lm = float(Objective("lm")(model, batch, "cpu"))
        both = float(Objective("lm+squarehead", other, squarehead_weight=0.5)(model, batch, "cpu"))
    assert len(hs) == 3 and got == pytest.approx(hand, rel=1e-5) and got > 0
    assert both == pytest.approx(lm + 0.5 * hand, rel=1e-5)


def test_objective_names():
    assert TuneConfig(objective="squarehead+kd").objective == "squarehead+kd"
    with pytest.raises(RecoupError, match=r"unknown objective 'kd\+kd'"):
        TuneConfig(objective="kd+kd")
    with pytest.raises(RecoupError, match="needs a teacher"):
        Objective("kd+squarehead")


def test_squarehead_behind_a_prefix_compares_the_batch_positions_and_trains_the_prefix():
    """A soft prompt's positions are not the teacher's: the student's layer outputs are compared on the batch's
    own positions, and the loss reaches the prefix."""
    model = tiny_model("llama", hidden=32, layers=2)
    ids = torch.randint(4, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    batch = collate([Sequence(ids=r.tolist()) for r in ids], 0)
    prefix = torch.nn.Parameter(torch.randn(3, 32) * 0.1)
    loss = Objective("kd+squarehead", tiny_model("llama", hidden=32, layers=2))(model, batch, "cpu", prefix)
    loss.backward()
    assert torch.isfinite(loss) and prefix.grad is not None and prefix.grad.abs().sum() > 0


def test_fp16_scale_grid_stays_fp16_and_exports_exactly_to_gguf_q4_0(tmp_path):
    """An artifact on float16 scales (``--scale-dtype float16``) keeps them float16 after tuning, so its GGUF Q4_0
    file still holds the tuned weights bit for bit."""
    from test_export import TEXT, TOK, artifact, run_export
    from transformers import AutoModelForCausalLM

    from recoup.recover.task_data import TuningData

    art = artifact(tmp_path, method="gptq", bits=4, group_size=64, scale_dtype="float16")
    seqs = [Sequence(ids=TOK(t)["input_ids"]) for t in TEXT[:12]]
    data = TuningData(train=seqs[:9], valid=seqs[9:], protocol={"toy": True})
    tuned, _ = fit_tune(art, TuneConfig(data="toy", steps=6, lr=2e-2, eval_every=3, batch_size=3), data)
    tuned.save(tmp_path / "tuned")
    old, new = load_qparams(art.path), load_qparams(tmp_path / "tuned")
    assert any(not torch.equal(old[n]["scale"], new[n]["scale"]) for n in old)
    assert all(torch.equal(new[n]["scale"].half().float(), new[n]["scale"]) for n in new)
    out = load_artifact(tmp_path / "tuned")
    res = run_export(out, tmp_path, "gguf")
    assert res["plan"]["linear_type"] == "Q4_0" and res["scales_exact_in_fp16"] is True
    m = AutoModelForCausalLM.from_pretrained(res["out"], gguf_file="model.gguf", dtype=torch.float32).eval()
    for name in new:
        assert torch.equal(m.get_submodule(name).weight, out.model.get_submodule(name).weight), name

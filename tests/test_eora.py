"""EoRA (training-free low-rank compensation) on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import save_tiny, tiny_model

from recoup.errors import RecoupError
from recoup.model.anatomy import _get, anatomy
from recoup.model.forward import forward_logits
from recoup.model.streamer import capture_inputs
from recoup.recover.eora import EoraConfig, EoraRecovery, compensate, eigen_compensation, fit
from recoup.recover.lora import LoraConfig

IDS = torch.randint(4, 100, (6, 24), generator=torch.Generator().manual_seed(1))


def pruned(model, fraction=0.6):
    """A copy of ``model`` with the smallest-magnitude ``fraction`` of every linear's weights zeroed."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for _, mod in anatomy(out).iter_linears():
            w = mod.weight
            k = int(w.numel() * fraction)
            w[w.abs() <= w.abs().flatten().kthvalue(k).values] = 0
    return out


def attach(compressed, state, rank):
    targets = anatomy(compressed).peft_target_modules("all")
    return EoraRecovery(LoraConfig(rank=rank, alpha=float(rank)), targets, state).apply(compressed)


def test_full_rank_reproduces_the_dense_model_and_leaves_the_base_unchanged():
    dense = tiny_model("llama")
    comp = pruned(dense)
    before = {n: m.weight.clone() for n, m in anatomy(comp).iter_linears()}
    targets = anatomy(comp).peft_target_modules("all")
    state = compensate(comp, dense, IDS, rank=32, targets=targets, batch_size=4)  # 32 = min(out, in) everywhere
    assert all(torch.equal(m.weight, before[n]) for n, m in anatomy(comp).iter_linears())
    with torch.no_grad():
        want = forward_logits(dense, IDS)
        assert (forward_logits(comp, IDS) - want).abs().max() > 1e-2  # the pruning did change the model
        # every layer's linears reproduce the dense ones on the calibration inputs
        inps, _ = capture_inputs(dense, anatomy(dense), IDS, 4)
        for name in ("self_attn.q_proj", "mlp.gate_proj"):
            full = f"model.layers.0.{name}"
            a, b = state[f"base_model.model.{full}.lora_A.weight"], state[f"base_model.model.{full}.lora_B.weight"]
            d_lin, c_lin = _get(anatomy(dense).layers[0], name), _get(anatomy(comp).layers[0], name)
            x = _get(anatomy(dense).layers[0], "input_layernorm")(inps)
            torch.testing.assert_close(c_lin(x) + x @ a.T @ b.T, d_lin(x), rtol=1e-4, atol=1e-5)
        got = forward_logits(attach(comp, state, 32), IDS)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def weighted_error(dw, x, b, a):
    return float(((dw - b @ a) @ x.T).pow(2).sum())


def test_layer_error_falls_monotonically_with_rank_and_beats_plain_svd():
    g = torch.Generator().manual_seed(0)
    dw = torch.randn(24, 16, generator=g)
    x = torch.randn(300, 16, generator=g) * torch.logspace(0, 2, 16)  # strongly anisotropic inputs
    xtx = x.T @ x
    errors = []
    for r in (1, 2, 4, 8, 12, 16):
        b, a, _ = eigen_compensation(dw, xtx, r, damp=1e-8)
        assert b.shape == (24, r) and a.shape == (r, 16)
        errors.append(weighted_error(dw, x, b, a))
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)  # plain SVD: best in the unweighted norm only
        plain = weighted_error(dw, x, u[:, :r] * s[:r], vh[:r])
        assert errors[-1] <= plain * (1 + 1e-6)
    assert all(e1 >= e2 for e1, e2 in zip(errors, errors[1:]))
    assert errors[-1] < 1e-6 * errors[0]
    # ranks above min(out, in) are zero-padded, still exact
    b, a, kept = eigen_compensation(dw, xtx, 20)
    assert kept == pytest.approx(1.0)
    torch.testing.assert_close(b @ a, dw, rtol=1e-4, atol=1e-4)


def test_model_error_falls_with_rank_on_held_out_ids():
    dense = tiny_model("llama")
    comp = pruned(dense)
    targets = anatomy(comp).peft_target_modules("all")
    held = torch.randint(4, 100, (6, 24), generator=torch.Generator().manual_seed(2))  # not the calibration ids
    with torch.no_grad():
        want = forward_logits(dense, held)
        errs = [float((forward_logits(comp, held) - want).pow(2).mean())]
        for r in (2, 8, 32):
            state = compensate(comp, dense, IDS, rank=r, targets=targets, batch_size=6)  # calibrated on IDS
            errs.append(float((forward_logits(attach(copy.deepcopy(comp), state, r), held) - want).pow(2).mean()))
    assert all(e1 > e2 for e1, e2 in zip(errs, errs[1:])), errs


@pytest.fixture()
def artifact(tmp_path):
    from recoup.artifact.store import save_artifact
    from recoup.compress import CompressConfig, compress
    from recoup.data.calibration import Calibration

    lm = save_tiny(tmp_path / "dense")
    rep = compress(
        lm,
        CompressConfig(method="sparsegpt", sparsity=0.5, bits=4, group_size=16),
        Calibration(input_ids=IDS, corpus="random", split="train", seqlen=24, seed=0),
    )
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(400)))
    return save_artifact(lm, rep, tmp_path / "art"), text


def test_eora_artifact_keeps_fingerprint_and_loads_in_peft_with_identical_logits(artifact, tmp_path):
    from peft import PeftModel

    from recoup.artifact import load_model
    from recoup.artifact.fingerprint import compression_fingerprint
    from recoup.recover.methods import RECOVERIES, load_recovery

    art, text = artifact
    loaded = load_model(str(art))
    digest = compression_fingerprint(loaded.model, loaded.manifest)["digest"]
    cfg = RECOVERIES.get("eora").config.from_dict({"rank": 4, "calib": str(text), "nsamples": 4, "seqlen": 32})
    rec, result = fit(loaded, cfg, None)
    assert result is None and rec.meta["compression_fingerprint"] == {
        **rec.meta["compression_fingerprint"],
        "digest": digest,
        "unchanged": True,
    }
    assert compression_fingerprint(loaded.model, loaded.manifest)["digest"] == digest
    rec.save(tmp_path / "eora")
    assert load_recovery(tmp_path / "eora").method == "eora"
    with torch.no_grad():
        plain = forward_logits(load_model(str(art)).model, IDS)
        peft_logits = forward_logits(PeftModel.from_pretrained(load_model(str(art)).model, str(tmp_path / "eora")), IDS)
        ours = forward_logits(load_recovery(tmp_path / "eora").apply(load_model(str(art)).model), IDS)
        dense = forward_logits(load_model(str(tmp_path / "dense")).model, IDS)
    assert torch.equal(peft_logits, ours)
    assert (ours - dense).pow(2).mean() < (plain - dense).pow(2).mean()  # moved toward the dense model
    assert rec.num_parameters() == sum(v.numel() for v in rec.state.values())


def test_missing_dense_source_is_one_clear_line(artifact, tmp_path):
    import shutil

    from recoup.artifact import load_model

    art, text = artifact
    shutil.rmtree(tmp_path / "dense")
    with pytest.raises(RecoupError, match="cannot load the dense source"):
        fit(load_model(str(art)), EoraConfig(rank=2, calib=str(text), nsamples=2, seqlen=16), None)
    with pytest.raises(RecoupError, match="not a compressed artifact"):
        from helpers import tiny_loaded

        fit(tiny_loaded("llama"), EoraConfig(rank=2, calib=str(text)), None)
    with pytest.raises(RecoupError, match="rank"):
        EoraConfig(rank=0)


def test_lora_inherits_the_compensation_whatever_its_alpha(artifact, tmp_path):
    """``--inherit EORA_DIR`` for LoRA / CPET: fine-tuning starts from the compensation (LoftQ-style init)."""
    from recoup.artifact import load_model
    from recoup.recover.lora import inherited_state

    art, text = artifact
    rec, _ = fit(load_model(str(art)), EoraConfig(rank=4, calib=str(text), nsamples=4, seqlen=32), None)
    cfg = LoraConfig(rank=4, alpha=16.0)
    lora = EoraRecovery(cfg, rec.target_modules, inherited_state(rec, cfg), rec.hidden_size)
    with torch.no_grad():
        want = forward_logits(rec.apply(load_model(str(art)).model), IDS)
        got = forward_logits(lora.apply(load_model(str(art)).model), IDS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- per-layer rank by energy


def test_kept_rank_is_the_smallest_rank_reaching_the_energy_capped_by_rank():
    from recoup.recover.eora import kept_rank

    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert kept_rank(s, 8, 9 / 14) == 1 and kept_rank(s, 8, 9 / 14 + 1e-6) == 2
    assert kept_rank(s, 8, 0.99) == 3 and kept_rank(s, 2, 0.99) == 2  # capped by rank
    assert kept_rank(s, 8, 1.0) == 4 and kept_rank(s, 8, None) == 4 and kept_rank(s, 3, None) == 3
    assert kept_rank(torch.zeros(4), 8, 0.5) == 1  # nothing to compensate: one (zero) component


def test_energy_one_with_a_full_cap_gives_full_rank_everywhere_and_the_dense_model():
    dense = tiny_model("llama")
    comp = pruned(dense)
    targets = anatomy(comp).peft_target_modules("all")
    kept: dict[str, float] = {}
    state = compensate(comp, dense, IDS, rank=64, targets=targets, batch_size=4, energy=1.0, kept=kept)
    rec = EoraRecovery(LoraConfig(rank=32, alpha=32.0), targets, state)
    ranks = rec.ranks()
    assert set(ranks) == set(kept) and len(ranks) == len(list(anatomy(comp).iter_linears())) == 14
    for name, r in ranks.items():
        assert r == min(_get(comp, name).weight.shape) and kept[name] == pytest.approx(1.0)
    assert set(rec.peft_config().rank_pattern.values()) == {16}  # k_proj / v_proj: (16, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            forward_logits(rec.apply(comp), IDS), forward_logits(dense, IDS), rtol=1e-4, atol=1e-4
        )


def eora_forward(model, state, ids):
    """Logits of ``model`` with every compensation added beside its linear by hooks (no PEFT involved)."""
    handles = []
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = state[key.replace(".lora_A.", ".lora_B.")]
            handles.append(
                _get(model, name).register_forward_hook(lambda _m, args, out, a=a, b=b: out + args[0] @ a.T @ b.T)
            )
    try:
        return forward_logits(model, ids)
    finally:
        for h in handles:
            h.remove()


def test_lower_energy_keeps_fewer_parameters_and_loads_in_peft_with_per_layer_ranks(artifact, tmp_path):
    import json

    from peft import PeftModel

    from recoup.artifact import load_model
    from recoup.recover.methods import load_recovery

    art, text = artifact
    common = {"calib": str(text), "nsamples": 4, "seqlen": 32}
    full, _ = fit(load_model(str(art)), EoraConfig(rank=64, energy=1.0, **common), None)
    part, _ = fit(load_model(str(art)), EoraConfig(rank=64, energy=0.6, **common), None)
    assert part.num_parameters() < full.num_parameters()
    assert all(v >= 0.6 for v in part.meta["kept_energy"].values())
    assert set(part.meta["ranks"]) == set(part.meta["kept_energy"]) and len(part.meta["ranks"]) == 14
    assert len(set(part.meta["ranks"].values())) > 1  # the threshold did pick different ranks
    assert part.cfg.rank == max(part.meta["ranks"].values()) == part.meta["rank_range"][1]
    part.save(tmp_path / "eora")
    saved = json.loads((tmp_path / "eora" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] and all(saved["alpha_pattern"][k] == r for k, r in saved["rank_pattern"].items())
    assert json.loads((tmp_path / "eora" / "recoup_recovery.json").read_text())["ranks"] == part.meta["ranks"]
    back = load_recovery(tmp_path / "eora")
    assert back.ranks() == part.meta["ranks"] and back.num_parameters() == part.num_parameters()
    with torch.no_grad():
        want = eora_forward(load_model(str(art)).model, part.state, IDS)
        peft_logits = forward_logits(PeftModel.from_pretrained(load_model(str(art)).model, str(tmp_path / "eora")), IDS)
        ours = forward_logits(back.apply(load_model(str(art)).model), IDS)
    assert torch.equal(peft_logits, ours)
    torch.testing.assert_close(peft_logits, want, rtol=1e-5, atol=1e-5)
    # a rank cap binds: no layer above it, and the kept share may then fall short of the threshold
    capped, _ = fit(load_model(str(art)), EoraConfig(rank=2, energy=0.99, **common), None)
    assert max(capped.meta["ranks"].values()) <= 2


@pytest.mark.parametrize("energy", [0.0, -0.5, 1.5, float("nan")])
def test_bad_energy_is_refused_in_one_line(energy):
    with pytest.raises(RecoupError, match=r"--energy must be in \(0, 1\]"):
        EoraConfig(energy=energy)


def test_lora_inherits_an_energy_ranked_compensation_and_peft_loads_the_result(artifact, tmp_path):
    """``recover --method lora --inherit EORA_DIR`` from an EoRA with per-layer ranks: the LoRA keeps those ranks
    (PEFT's rank_pattern), starts from exactly the compensation's output, trains, and PEFT loads what it saved."""
    import json

    from peft import PeftModel

    from recoup.artifact import load_model
    from recoup.cli import main
    from recoup.recover.lora import LoraRecovery, inherited_state
    from recoup.recover.methods import load_recovery

    art, text = artifact
    part, _ = fit(load_model(str(art)), EoraConfig(rank=64, energy=0.6, calib=str(text), nsamples=4, seqlen=32), None)
    assert len(set(part.ranks().values())) > 1
    part.save(tmp_path / "eora")
    init = LoraRecovery.load(tmp_path / "eora")
    cfg = LoraConfig(rank=part.cfg.rank, alpha=16.0)
    start = LoraRecovery(cfg, init.target_modules, inherited_state(init, cfg), init.hidden_size)
    assert start.ranks() == part.ranks()
    with torch.no_grad():
        torch.testing.assert_close(
            forward_logits(start.apply(load_model(str(art)).model), IDS),
            forward_logits(part.apply(load_model(str(art)).model), IDS),
            rtol=1e-5,
            atol=1e-5,
        )
    assert (
        main(
            [
                "recover",
                str(art),
                "--method",
                "lora",
                "--inherit",
                str(tmp_path / "eora"),
                "--rank",
                str(part.cfg.rank),
                "--data",
                str(text),
                "--steps",
                "2",
                "--seqlen",
                "24",
                "--batch-size",
                "2",
                "--out",
                str(tmp_path / "lora"),
            ]
        )
        == 0
    )
    lora = load_recovery(tmp_path / "lora")
    assert lora.meta["init"] == "inherited" and lora.ranks() == part.ranks()
    assert any(not torch.equal(lora.state[k], v) for k, v in start.state.items())  # it trained
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] and saved["lora_alpha"] == 16.0
    with torch.no_grad():
        theirs = forward_logits(PeftModel.from_pretrained(load_model(str(art)).model, str(tmp_path / "lora")), IDS)
        ours = forward_logits(lora.apply(load_model(str(art)).model), IDS)
    assert torch.equal(theirs, ours)


def test_a_lora_with_per_module_alphas_at_other_scalings_is_refused_in_one_line(artifact, tmp_path):
    import json

    from recoup.artifact import load_model
    from recoup.recover.lora import LoraRecovery

    art, text = artifact
    part, _ = fit(load_model(str(art)), EoraConfig(rank=64, energy=0.6, calib=str(text), nsamples=4, seqlen=32), None)
    part.save(tmp_path / "eora")
    cfg_file = tmp_path / "eora" / "adapter_config.json"
    raw = json.loads(cfg_file.read_text())
    raw["alpha_pattern"] = {k: 2.0 * v for k, v in raw["alpha_pattern"].items()}
    cfg_file.write_text(json.dumps(raw))
    with pytest.raises(RecoupError, match="alpha_pattern"):
        LoraRecovery.load(tmp_path / "eora")


def test_init_eora_starts_lora_and_cpet_from_the_compensation_in_one_command(artifact, tmp_path):
    from recoup.artifact import load_model
    from recoup.cli import main
    from recoup.recover.lora import LoraMethodConfig
    from recoup.recover.methods import load_recovery

    art, text = artifact
    alone, _ = fit(load_model(str(art)), EoraConfig(rank=4, calib=str(text), nsamples=4), None)
    start = LoraMethodConfig(rank=4, init="eora", calib=str(text), nsamples=4, data=str(text)).initial(
        load_model(str(art))
    )
    assert start.state.keys() == alone.state.keys() and all(
        torch.equal(start.state[k], v) for k, v in alone.state.items()
    )
    common = [
        "--rank",
        "4",
        "--init",
        "eora",
        "--calib",
        str(text),
        "--nsamples",
        "4",
        "--data",
        str(text),
        "--steps",
        "2",
        "--seqlen",
        "24",
        "--batch-size",
        "2",
    ]
    for method in ("lora", "cpet"):
        assert main(["recover", str(art), "--method", method, "--out", str(tmp_path / method)] + common) == 0
        meta = load_recovery(tmp_path / method).meta
        assert meta["init"] == "eora" and meta["eora"]["calibration"]["nsamples"] == 4
    assert (
        main(
            [
                "recover",
                str(art),
                "--method",
                "lora",
                "--out",
                str(tmp_path / "bad"),
                "--inherit",
                str(tmp_path / "lora"),
            ]
            + common
        )
        == 2
    )
    assert (
        main(
            [
                "recover",
                str(art),
                "--method",
                "lora",
                "--out",
                str(tmp_path / "bad"),
                "--init",
                "loftq",
                "--data",
                str(text),
            ]
        )
        == 2
    )


def test_damping_in_place_is_the_textbook_expression_bitwise():
    """The eigenvalue damping goes onto the diagonal in place (no identity matrix and sum beside the Hessian):
    the factors are bitwise those of H + c I written out."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 48, generator=g)
    xtx, dw = x.T @ x, torch.randn(20, 48, generator=g)
    b, a, kept = eigen_compensation(dw, xtx, 8)
    h = xtx.double()
    h = h + 0.01 * h.diagonal().mean().clamp(min=1e-12) * torch.eye(48, dtype=torch.float64)
    lam, q = torch.linalg.eigh(h)
    sq = lam.clamp(min=1e-12).sqrt()
    u, s, vh = torch.linalg.svd(dw.double() @ q * sq, full_matrices=False)
    root = s[:8].sqrt()
    assert torch.equal(b, (u[:, :8] * root).float()) and torch.equal(a, ((root[:, None] * vh[:8] / sq) @ q.T).float())

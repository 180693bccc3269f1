import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model, tiny_tokenizer
from test_lora import IDS, sparsify, toy_data
from torch import nn

from recoup import RecoupError
from recoup.model.forward import forward_logits
from recoup.recover.adapter import LoraConfig
from recoup.recover.base import linear_digests
from recoup.recover.cpet import (
    CpetConfig,
    CpetRecovery,
    RecoveryModule,
    build_cpet,
    distill_loss,
    fit_cpet,
    hidden_indices,
    make_teacher,
    modules_attached,
    recovery_targets,
)
from recoup.recover.lora import fit_lora
from recoup.recover.losses import mean_loss
from recoup.recover.train import TrainConfig


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_zero_init_recovery_modules_leave_outputs_unchanged(arch):
    model = tiny_model(arch)
    with torch.no_grad():
        ref = forward_logits(model, IDS)
    modules = CpetRecovery.new_modules(model, CpetConfig(recovery_rank=4))
    assert len(modules) == len(recovery_targets(model, "all"))
    with modules_attached(model, modules), torch.no_grad():
        assert torch.equal(forward_logits(model, IDS), ref)
        for m in modules.values():  # once U is non-zero the bypass changes the output
            nn.init.normal_(m.up.weight, std=0.5)
        assert not torch.allclose(forward_logits(model, IDS), ref)
    with torch.no_grad():  # hooks removed on exit
        assert torch.equal(forward_logits(model, IDS), ref)


def test_recovery_module_math():
    rm = RecoveryModule(6, 5, 3)
    nn.init.normal_(rm.up.weight)
    x = torch.randn(2, 4, 6)
    assert torch.allclose(rm(x), F.gelu(x @ rm.down.weight.T) @ rm.up.weight.T)


def test_inheritance_copies_the_dense_lora_and_starts_from_its_output():
    tok = tiny_tokenizer()
    dense_rec, _, dense_wrapped = fit_lora(
        tiny_model("llama"), tok, toy_data(tok), LoraConfig(rank=4), TrainConfig(steps=5, lr=1e-2)
    )
    compressed = tiny_model("llama")
    sparsify(compressed)
    from peft import get_peft_model_state_dict

    rec, wrapped = build_cpet(compressed, CpetConfig(rank=4, recovery_rank=4), inherit=dense_rec)
    got = get_peft_model_state_dict(wrapped)
    assert all(torch.equal(got[k], dense_rec.state[k]) for k in dense_rec.state)
    # at step 0 (recovery modules zero) CPET computes exactly compressed + the dense LoRA
    ref_model = tiny_model("llama")
    sparsify(ref_model)
    ref = dense_rec.apply(ref_model)
    with torch.no_grad():
        assert torch.equal(forward_logits(wrapped, IDS), forward_logits(ref, IDS))
    random_rec, _ = build_cpet(tiny_model("llama"), CpetConfig(rank=4), inherit=None)
    random_rec.lora.capture(_)
    assert any(not torch.equal(random_rec.lora.state[k], dense_rec.state[k]) for k in dense_rec.state)


def test_distill_loss_values():
    s = [torch.randn(2, 5, 8)]
    t = [s[0] + 1.0]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert distill_loss(s, s, mask).item() == 0.0
    assert distill_loss(s, t, mask, alpha=2.0).item() == pytest.approx(2.0)
    t_pad_only = [s[0].clone()]
    t_pad_only[0][0, 3:] += 10.0  # differences on padded positions do not count
    assert distill_loss(s, t_pad_only, mask).item() == 0.0
    logits = torch.randn(2, 4, 11)
    keep, labels = torch.arange(4), torch.zeros(2, 5, dtype=torch.long)  # every next token scored
    assert distill_loss(s, s, mask, logits, logits, keep, labels, kl_weight=1.0).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 4, 11)
    kl = distill_loss(s, s, mask, logits, other, keep, labels, kl_weight=1.0, temperature=1.0).item()
    ref = F.kl_div(
        F.log_softmax(logits.reshape(-1, 11), -1),
        F.log_softmax(other.reshape(-1, 11), -1),
        log_target=True,
        reduction="batchmean",
    ).item()
    assert kl == pytest.approx(ref, rel=1e-5) and kl > 0


def test_hidden_indices():
    assert hidden_indices(CpetConfig(distill_layers="last"), 30) == [30]
    assert hidden_indices(CpetConfig(distill_layers="all"), 3) == [1, 2, 3]
    assert hidden_indices(CpetConfig(distill_layers="0,2"), 3) == [1, 3]
    with pytest.raises(RecoupError, match="out of range"):
        hidden_indices(CpetConfig(distill_layers="5"), 3)
    with pytest.raises(RecoupError, match="distill_layers"):
        CpetConfig(distill_layers="middle")


def test_full_cpet_trains_keeps_base_and_round_trips(tmp_path):
    from peft import PeftModel

    tok = tiny_tokenizer()
    data = toy_data(tok)
    dense = tiny_model("llama")
    dense_rec, _, _ = fit_lora(dense, tok, data, LoraConfig(rank=4), TrainConfig(steps=20, lr=1e-2))
    teacher = make_teacher(tiny_model("llama"), dense_rec)
    compressed = tiny_model("llama")
    masks = sparsify(compressed)
    before = linear_digests(compressed)
    start_model = tiny_model("llama")
    sparsify(start_model)
    start = mean_loss(dense_rec.apply(start_model), data.valid, tok.pad_token_id)  # CPET at step 0
    cfg = CpetConfig(rank=4, recovery_rank=4, distill_alpha=1.0, kl_weight=0.5, distill_layers="all")
    rec, result, wrapped = fit_cpet(
        compressed, tok, data, cfg, TrainConfig(steps=16, lr=1e-2, eval_every=8), inherit=dense_rec, teacher=teacher
    )
    assert result.best_val_loss < start
    assert linear_digests(wrapped) == before
    assert rec.meta["mean_distill_loss"] > 0
    assert rec.num_parameters() == rec.lora.num_parameters() + sum(p.numel() for p in rec.modules.parameters())
    assert any(m.up.weight.abs().sum() > 0 for m in rec.modules.values())  # recovery modules learned
    with torch.no_grad():
        trained = forward_logits(wrapped, IDS)
    rec.save(tmp_path / "cpet")
    fresh = tiny_model("llama")
    sparsify(fresh)
    loaded = CpetRecovery.load(tmp_path / "cpet")
    with torch.no_grad():
        assert torch.allclose(forward_logits(loaded.apply(fresh), IDS), trained, atol=1e-6)
    # the LoRA part is a normal PEFT LoRA directory
    fresh2 = tiny_model("llama")
    sparsify(fresh2)
    PeftModel.from_pretrained(fresh2, str(tmp_path / "cpet"))
    from recoup.model.anatomy import anatomy

    for name, mod in anatomy(wrapped.get_base_model()).iter_linears():
        assert not mod.base_layer.weight[~masks[name]].any()  # pruned zeros stay zero


def test_distill_without_teacher_is_a_clear_error():
    tok = tiny_tokenizer()
    with pytest.raises(RecoupError, match="teacher"):
        fit_cpet(tiny_model("llama"), tok, toy_data(tok), CpetConfig(distill=True), TrainConfig(steps=1))


def test_distillation_pulls_the_student_toward_the_teacher():
    """Same data, init and steps: with the distillation term the compressed student ends closer to the
    teacher's final hidden states than without it."""
    from recoup.recover.losses import model_outputs
    from recoup.recover.task_data import collate

    tok = tiny_tokenizer()
    data = toy_data(tok)
    dense_rec, _, _ = fit_lora(tiny_model("llama"), tok, data, LoraConfig(rank=4), TrainConfig(steps=10, lr=1e-2))
    teacher = make_teacher(tiny_model("llama"), dense_rec)
    batch = collate(data.valid, tok.pad_token_id)

    def distance(distill: bool) -> float:
        student = tiny_model("llama")
        sparsify(student)
        cfg = CpetConfig(rank=4, recovery_modules=False, distill=distill, distill_alpha=50.0, distill_layers="last")
        _, _, wrapped = fit_cpet(
            student,
            tok,
            data,
            cfg,
            TrainConfig(steps=12, lr=1e-2, eval_every=12),
            inherit=dense_rec,
            teacher=teacher if distill else None,
        )
        with torch.no_grad():
            s, _ = model_outputs(wrapped, batch, "cpu", hidden=True)
            t, _ = model_outputs(teacher, batch, "cpu", hidden=True)
        m = batch.attention_mask.bool()
        return float((s.hidden_states[-1] - t.hidden_states[-1])[m].pow(2).mean())

    assert distance(True) < distance(False)

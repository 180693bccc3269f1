import pytest
import torch
from helpers import tiny_model, tiny_tokenizer

from recoup import RecoupError
from recoup.model.anatomy import anatomy
from recoup.model.forward import forward_logits
from recoup.recover.adapter import LoraConfig, LoraRecovery
from recoup.recover.base import linear_digests
from recoup.recover.lora import fit_lora
from recoup.recover.losses import mean_loss
from recoup.recover.task_data import TuningData, completion_sequence
from recoup.recover.train import TrainConfig


def sparsify(model, fraction=0.5):
    """Zero the smallest-magnitude half of every targeted linear; returns the masks (True = kept)."""
    masks = {}
    with torch.no_grad():
        for name, mod in anatomy(model).iter_linears():
            w = mod.weight
            k = int(w.numel() * fraction)
            thresh = w.abs().flatten().kthvalue(k).values
            masks[name] = w.abs() > thresh
            w.mul_(masks[name])
    return masks


def toy_data(tok, n=48):
    seqs = [completion_sequence(tok, f"item {i} is", " " + "abcdef"[i % 6] * 3, 32) for i in range(n)]
    return TuningData(train=seqs[: n - 8], valid=seqs[n - 8 :], protocol={"toy": True})


IDS = torch.tensor([[5, 17, 23, 40, 41, 8, 9, 60]])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_fresh_adapter_leaves_outputs_unchanged(arch):
    model = tiny_model(arch)
    with torch.no_grad():
        ref = forward_logits(model, IDS)
    rec = LoraRecovery.for_model(model, LoraConfig(rank=4))
    wrapped = rec.apply(model, seed=0)
    with torch.no_grad():
        assert torch.equal(forward_logits(wrapped, IDS), ref)
    rec.capture(wrapped)
    n_lora = sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n)
    assert rec.num_parameters() == n_lora > 0


def test_training_lowers_loss_and_keeps_sparse_base_bit_identical():
    tok = tiny_tokenizer()
    model = tiny_model("llama", layers=2)
    masks = sparsify(model)
    before = linear_digests(model)
    weights = {n: m.weight.detach().clone() for n, m in anatomy(model).iter_linears()}
    data = toy_data(tok)
    start = mean_loss(model, data.valid, tok.pad_token_id)
    rec, result, wrapped = fit_lora(
        model, tok, data, LoraConfig(rank=4), TrainConfig(steps=40, lr=1e-2, eval_every=20), batch_size=8
    )
    assert result.best_val_loss < start - 0.1
    assert linear_digests(wrapped) == before
    base = wrapped.get_base_model()
    for name, mod in anatomy(base).iter_linears():
        assert torch.equal(mod.base_layer.weight, weights[name])
        assert not mod.base_layer.weight[~masks[name]].any()  # pruned zeros stay zero (never merged)
    assert rec.describe()["merged"] is False


def test_save_loads_in_peft_and_in_recoup_with_identical_logits(tmp_path):
    from peft import PeftModel

    tok = tiny_tokenizer()
    model = tiny_model("llama")
    rec, _, wrapped = fit_lora(model, tok, toy_data(tok), LoraConfig(rank=4), TrainConfig(steps=5, lr=1e-2))
    with torch.no_grad():
        trained = forward_logits(wrapped, IDS)
        assert not torch.allclose(trained, forward_logits(tiny_model("llama"), IDS))
    rec.save(tmp_path / "lora")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "lora").iterdir()}
    peft_model = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "lora"))
    ours = LoraRecovery.load(tmp_path / "lora").apply(tiny_model("llama"))
    with torch.no_grad():
        assert torch.allclose(forward_logits(peft_model, IDS), trained, atol=1e-6)
        assert torch.allclose(forward_logits(ours, IDS), trained, atol=1e-6)


def test_inherited_init_copies_the_weights():
    tok = tiny_tokenizer()
    dense_rec, _, _ = fit_lora(
        tiny_model("llama"), tok, toy_data(tok), LoraConfig(rank=4), TrainConfig(steps=3, lr=1e-2)
    )
    other = tiny_model("llama", seed=1)
    wrapped = LoraRecovery(LoraConfig(rank=4), dense_rec.target_modules, dense_rec.state).apply(other)
    from peft import get_peft_model_state_dict

    got = get_peft_model_state_dict(wrapped)
    assert got.keys() == dense_rec.state.keys()
    assert all(torch.equal(got[k], dense_rec.state[k]) for k in got)


def test_mismatched_rank_and_hidden_size_are_one_clear_line():
    tok = tiny_tokenizer()
    rec, _, _ = fit_lora(tiny_model("llama"), tok, toy_data(tok), LoraConfig(rank=4), TrainConfig(steps=1))
    wrong_rank = LoraRecovery(LoraConfig(rank=2), rec.target_modules, rec.state)
    with pytest.raises(RecoupError, match="does not fit this model"):
        wrong_rank.apply(tiny_model("llama"))
    with pytest.raises(RecoupError, match="hidden size 32"):
        rec.apply(tiny_model("llama", hidden=48))
    with pytest.raises(RecoupError, match="same --rank"):
        fit_lora(tiny_model("llama"), tok, toy_data(tok), LoraConfig(rank=8), TrainConfig(steps=1), init=rec)


def test_config_rejects_bad_values():
    with pytest.raises(RecoupError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(RecoupError, match="did you mean 'rank'"):
        LoraConfig.from_dict({"rnak": 4})
    with pytest.raises(RecoupError, match="targets"):
        LoraConfig(targets="ffn")


def test_apply_and_capture_never_reload_the_base_config(monkeypatch, tmp_path):
    """PEFT's default state-dict export reloads the base model's config to check for resized embeddings: for a
    hub id that is a Hub request (offline: a stall and a warning), for a packed artifact a model-type warning.
    The adapter never resizes embeddings, so neither may happen."""
    import warnings

    import peft.utils.save_and_load as sl

    def no_hub(*a, **k):
        raise AssertionError("PEFT asked the Hub for the base model's config")

    monkeypatch.setattr(sl, "check_file_exists_on_hf_hub", no_hub)
    model = tiny_model("llama")
    for name_or_path in ("some-org/some-model", str(tmp_path)):
        (tmp_path / "config.json").write_text('{"model_type": "not-llama", "vocab_size": 1}')
        model.config._name_or_path = model.name_or_path = name_or_path
        rec = LoraRecovery.for_model(model, LoraConfig(rank=4))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            wrapped = rec.apply(model, seed=0)
            rec.capture(wrapped)
            LoraRecovery.load_into(wrapped, rec.state)
        model = wrapped.unload()

"""Export: each destination's own loader gives recoup's logits; a packed artifact fails loudly in plain
transformers; a recovery exported beside a model loads with PEFT; bad input is one line, exit 2.

Tolerances: fp32 exports must match within 1e-5 x the logit scale (max |logit|); GGUF Q-types store each
block scale as fp16, so a grid fitted with float32 scales matches within that rounding (relative 2^-11
per weight, stated below as 2e-3 x logit scale), and a grid fitted with fp16 scales matches like fp32.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_config
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from recoup.artifact.export import ExportConfig, export
from recoup.artifact.export.compressed_tensors import pack_int32
from recoup.artifact.store import load_artifact, save_artifact
from recoup.cli import main
from recoup.compress import CompressConfig, compress
from recoup.data.calibration import Calibration
from recoup.errors import RecoupError
from recoup.model.load import LoadedModel

TEXT = [
    "the quick brown fox jumps over the lazy dog 0123456789",
    "recoup exports compressed models",
    "Hello world! How are you today?",
] * 20


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE (GPT-2 style, ~300 tokens): what GGUF's ``gpt2`` tokenizer model holds."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(
        TEXT,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


TOK = bpe_tokenizer()
X = torch.randint(3, len(TOK), (2, 20), generator=torch.Generator().manual_seed(1))


def tiny(arch: str = "llama", seed: int = 0, tie: bool = False) -> LoadedModel:
    torch.manual_seed(seed)
    cfg = tiny_config(arch, hidden=64, layers=2, vocab=len(TOK) + 4)  # room for a token a tokenizer class adds
    cfg.tie_word_embeddings = tie
    if arch == "qwen3":  # transformers' GGUF reader takes qwen3's head_dim from its default (128), not the file
        cfg.head_dim = 128
    return LoadedModel(AutoModelForCausalLM.from_config(cfg).eval(), TOK, f"tiny-{arch}", None)


def calib() -> Calibration:
    ids = torch.randint(3, len(TOK), (8, 32), generator=torch.Generator().manual_seed(0))
    return Calibration(input_ids=ids, corpus="random", split="train", seqlen=32, seed=0)


def artifact(tmp_path, arch="llama", tie=False, **cfg) -> LoadedModel:
    lm = tiny(arch, tie=tie)
    conf = CompressConfig.from_dict(cfg)
    rep = compress(lm, conf, calib() if conf.method != "rtn" and conf.method != "magnitude" else None)
    return load_artifact(save_artifact(lm, rep, tmp_path / "art"))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits.float()


def assert_close(got, ref, rel):
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= rel * scale, ((got - ref).abs().max().item(), scale)


def run_export(art, tmp_path, fmt, name=None, **kw) -> dict:
    return export(ExportConfig(source=str(art.path), format=fmt, out=str(tmp_path / (name or fmt)), **kw))


# ------------------------------------------------------------------------------------------- hf


@pytest.mark.parametrize("dtype,rel", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_hf_export_loads_in_plain_transformers(tmp_path, dtype, rel):
    art = artifact(tmp_path, method="sparsegpt", sparsity=0.5, bits=4, group_size=32)
    res = run_export(art, tmp_path, "hf", dtype=dtype)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization_config" not in cfg and not any("recoup" in k for k in cfg)
    side = json.loads((tmp_path / "hf" / "recoup_export.json").read_text())
    assert side["compression"]["method"] == "sparsegpt" and side["compression"]["summary"]["bits"] == 4
    m = AutoModelForCausalLM.from_pretrained(res["out"], dtype=torch.float32).eval()
    assert_close(logits(m), logits(art.model), rel)
    if dtype == "float32":  # zeros and grid values kept exactly
        for (k, a), (_, b) in zip(m.state_dict().items(), art.model.state_dict().items()):
            assert torch.equal(a, b), k


# ------------------------------------------------------------------------------ compressed-tensors


def test_pack_int32_matches_compressed_tensors():
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    for bits in (2, 3, 4, 7):
        v = torch.randint(0, 2**bits, (5, 70), generator=torch.Generator().manual_seed(bits))
        ref = ct.pack_to_int32((v - 2 ** (bits - 1)).to(torch.int8), bits)
        assert torch.equal(pack_int32(v, bits), ref)
        ref0 = ct.pack_to_int32((v - 2 ** (bits - 1)).to(torch.int8), bits, packed_dim=0)
        assert torch.equal(pack_int32(v.t(), bits).t(), ref0)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(method="sparsegpt", sparsity=0.5, bits=4, group_size=32),
        dict(method="rtn", bits=3, group_size=-1),
        dict(method="rtn", bits=8, group_size=32),
        dict(method="awq", bits=4, group_size=32),
        dict(method="awq", bits=3, group_size=32, rounding="gptq"),
    ],
)
def test_compressed_tensors_loads_in_transformers(tmp_path, cfg):
    pytest.importorskip("compressed_tensors")
    art = artifact(tmp_path, **cfg)
    res = run_export(art, tmp_path, "compressed-tensors")
    qc = json.loads((tmp_path / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["sparsity_config"] == {}
    assert "lm_head" in qc["ignore"] and res["quantized_linears"] > 0
    m = AutoModelForCausalLM.from_pretrained(res["out"], dtype=torch.float32).eval()
    assert_close(logits(m), logits(art.model), 1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_compressed_tensors_asymmetric_decompresses_bitwise(tmp_path, bits):
    """Asymmetric grids: compressed-tensors' own decompressor (what vLLM's layout mirrors) gives recoup's
    weights bit for bit. (transformers 5.24 + compressed-tensors 0.20.1 cannot load ANY asymmetric
    pack-quantized checkpoint: its skeleton expects an unpacked zero point, so that path is not tested.)"""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file

    art = artifact(tmp_path, method="gptq", bits=bits, group_size=64, sym=False)
    res = run_export(art, tmp_path, "compressed-tensors")
    qc = json.loads((tmp_path / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    weights = QuantizationArgs(**qc["config_groups"]["group_0"]["weights"])
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    comp = BaseCompressor.get_value_from_registry(qc["format"])
    state = load_file(str(tmp_path / "compressed-tensors" / "model.safetensors"))
    for name in art.manifest["layers"]:
        name = name["name"]
        local = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
        w = comp.decompress(local, scheme)["weight"]
        assert torch.equal(w.float(), art.model.get_submodule(name).weight), name
    assert ct.__version__ and res["quantized_linears"] == len(art.manifest["layers"])


def test_compressed_tensors_refuses_what_it_cannot_hold(tmp_path):
    sparse = artifact(tmp_path, method="magnitude", sparsity=0.5)
    with pytest.raises(RecoupError, match="use --format hf"):
        run_export(sparse, tmp_path, "compressed-tensors")
    ragged = artifact(tmp_path / "r", method="rtn", bits=4, group_size=48)  # 64 columns: ragged last group
    with pytest.raises(RecoupError, match="ragged"):
        run_export(ragged, tmp_path, "compressed-tensors")
    assert not (tmp_path / "compressed-tensors").exists()


# ------------------------------------------------------------------------------------------ gguf


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize(
    "cfg,qtype,rel",
    [
        (dict(method="sparsegpt", sparsity=0.5, bits=4, group_size=64), "Q4_0", 2e-3),
        (dict(method="rtn", bits=4, group_size=32, sym=False), "Q4_1", 2e-3),
        (dict(method="gptq", bits=8, group_size=32), "Q8_0", 2e-3),
        (dict(method="rtn", bits=3, group_size=32), "F32", 1e-5),
    ],
)
def test_gguf_loads_in_transformers_reader(tmp_path, arch, cfg, qtype, rel):
    art = artifact(tmp_path, arch=arch, tie=arch == "qwen3", **cfg)
    res = run_export(art, tmp_path, "gguf")
    assert res["plan"]["linear_type"] == qtype
    m = AutoModelForCausalLM.from_pretrained(res["out"], gguf_file="model.gguf", dtype=torch.float32).eval()
    assert_close(logits(m), logits(art.model), rel)
    if arch == "llama":  # the tokenizer llama.cpp reads is the artifact's
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(res["out"], gguf_file="model.gguf")
        for text in TEXT[:3]:
            assert tok(text)["input_ids"] == TOK(text)["input_ids"]


def test_gguf_fp16_scale_grid_is_exact_q4_0(tmp_path):
    """QuantGrid(scale_dtype='float16'): the Q4_0 file holds the artifact's weights with no rounding at all."""
    from recoup.artifact.grid import QuantGrid

    lm = tiny()
    grid = QuantGrid(4, True, 64, scale_dtype="float16")
    qparams, names = {}, []
    for name, mod in lm.model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            w, s, z = grid.quantize_matrix(mod.weight.data)
            mod.weight.data.copy_(w)
            qparams[name] = {"scale": s, "zero": z, "g_idx": grid.group_index(w.shape[1])}
            names.append(name)
    rep = compress(tiny(), CompressConfig(method="rtn", bits=4, group_size=64), None)
    rep.qparams = qparams  # the same linears, on the fp16-scale grid
    art = load_artifact(save_artifact(lm, rep, tmp_path / "art"))
    res = run_export(art, tmp_path, "gguf")
    assert res["plan"]["linear_type"] == "Q4_0" and res["scales_exact_in_fp16"] is True
    m = AutoModelForCausalLM.from_pretrained(res["out"], gguf_file="model.gguf", dtype=torch.float32).eval()
    for name in names:
        assert torch.equal(m.get_submodule(name).weight, art.model.get_submodule(name).weight), name
    assert_close(logits(m), logits(art.model), 1e-5)


@pytest.mark.parametrize("method,extra", [("gptq", {}), ("sparsegpt", {"sparsity": 0.5})])
def test_compress_scale_dtype_float16_makes_gptq_exact_in_q4_0(tmp_path, method, extra):
    """``--scale-dtype float16``: GPTQ (or SparseGPT + 4-bit) lands on grids a Q4_0 file holds bit for bit."""
    art = artifact(tmp_path, method=method, bits=4, group_size=64, scale_dtype="float16", **extra)
    res = run_export(art, tmp_path, "gguf")
    assert res["plan"]["linear_type"] == "Q4_0" and res["scales_exact_in_fp16"] is True
    m = AutoModelForCausalLM.from_pretrained(res["out"], gguf_file="model.gguf", dtype=torch.float32).eval()
    for name, mod in art.model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            assert torch.equal(m.get_submodule(name).weight, mod.weight), name


def test_gguf_refusals(tmp_path):
    art = artifact(tmp_path, method="rtn", bits=3, group_size=32)
    with pytest.raises(RecoupError, match="--bits 4 --sym"):
        run_export(art, tmp_path, "gguf", gguf_type="Q4_0")
    opt = artifact(tmp_path / "o", arch="opt", method="rtn", bits=4, group_size=32)
    with pytest.raises(RecoupError, match="no OPT"):
        run_export(opt, tmp_path, "gguf")


# ----------------------------------------------------------------------------- no silent garbage


def test_packed_artifact_fails_loudly_in_plain_transformers(tmp_path):
    art = artifact(tmp_path, method="sparsegpt", sparsity=0.5, bits=4, group_size=32)
    assert art.manifest["storage"]["kind"] == "packed"
    with pytest.raises(ValueError, match="recoup export"):
        AutoModelForCausalLM.from_pretrained(str(art.path))
    again = load_artifact(art.path)  # recoup itself still loads it, bit for bit
    assert torch.equal(logits(again.model), logits(art.model))


# ------------------------------------------------------------------------------------- recovery


def lora_dir(model, path, base: str | None = None):
    import peft

    torch.manual_seed(3)
    wrapped = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    for n, p in wrapped.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    wrapped.save_pretrained(str(path))
    ref = logits(wrapped)
    wrapped.unload()
    return ref


@pytest.mark.parametrize("fmt", ["hf", "compressed-tensors"])
def test_recovery_beside_export_loads_with_peft(tmp_path, fmt):
    pytest.importorskip("compressed_tensors")
    from peft import AutoPeftModelForCausalLM

    art = artifact(tmp_path, method="sparsegpt", sparsity=0.5, bits=4, group_size=32)
    ref = lora_dir(load_artifact(art.path).model, tmp_path / "lora")
    res = run_export(art, tmp_path, fmt, recovery=str(tmp_path / "lora"))
    cfg = json.loads((tmp_path / fmt / "recovery" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == res["out"]
    kw = {}
    if fmt == "compressed-tensors":  # PEFT wraps nn.Linear weights: transformers decompresses them on load
        from transformers import CompressedTensorsConfig

        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    m = AutoPeftModelForCausalLM.from_pretrained(res["recovery"], dtype=torch.float32, **kw).eval()
    assert_close(logits(m), ref, 1e-5)


def test_merge_only_into_hf_and_recorded(tmp_path):
    art = artifact(tmp_path, method="sparsegpt", sparsity=0.5, bits=4, group_size=32)
    ref = lora_dir(load_artifact(art.path).model, tmp_path / "lora")
    with pytest.raises(RecoupError, match="densify"):
        ExportConfig(
            source=str(art.path),
            format="compressed-tensors",
            out=str(tmp_path / "x"),
            recovery=str(tmp_path / "lora"),
            merge=True,
        )
    res = run_export(art, tmp_path, "hf", recovery=str(tmp_path / "lora"), merge=True)
    side = json.loads((tmp_path / "hf" / "recoup_export.json").read_text())
    assert side["recovery"]["merged"] is True and "dense" in side["merge"] and res["recovery"] is None
    m = AutoModelForCausalLM.from_pretrained(res["out"], dtype=torch.float32).eval()
    assert_close(logits(m), ref, 1e-5)


# ------------------------------------------------------------------------------------ bad input


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    art = artifact(tmp_path, method="rtn", bits=3, group_size=32)
    plain = tmp_path / "plain"
    tiny().model.save_pretrained(str(plain))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    cases = [
        (["--format", "ggfu"], "did you mean 'gguf'"),
        (["--format", "gguf", "--gguf-type", "Q4_0"], "does not hold"),
        (["--format", "compressed-tensors", "--out", str(tmp_path / "full")], "already exists"),
        (["--format", "hf", "--dtype", "float8"], "--dtype"),
        (["--format", "hf", "--merge"], "--merge needs --recovery"),
    ]
    capsys.readouterr()
    for extra, needle in cases:
        argv = ["export", str(art.path), "--out", str(tmp_path / "new")] + extra
        assert main(argv) == 2, extra
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert main(["export", str(plain), "--format", "hf", "--out", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a recoup artifact" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "new").exists() and (tmp_path / "full" / "x").read_text() == "keep me"
    assert main(["export", str(art.path), "--format", "gguf", "--out", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "model.gguf").is_file()


def test_saved_recoveries_record_a_usable_base(tmp_path, monkeypatch):
    """A LoRA / soft prompt saved by recoup names its base as a path PEFT resolves (never null)."""
    from peft import AutoPeftModelForCausalLM

    from recoup.recover.lora import LoraConfig, LoraRecovery
    from recoup.recover.soft_prompt import SoftPrompt

    lm = tiny()
    lm.model.save_pretrained(str(tmp_path / "base"))
    base = logits(lm.model)
    monkeypatch.chdir(tmp_path)
    rec = LoraRecovery.for_model(lm.model, LoraConfig(rank=2))
    wrapped = rec.apply(lm.model, seed=0)
    torch.manual_seed(3)
    for n, p in wrapped.named_parameters():
        if "lora_B" in n:  # non-zero: the loaded adapter must change the logits as recoup's does
            p.data.normal_(0, 0.05)
    rec.capture(wrapped)
    ref = logits(wrapped)
    assert not torch.allclose(ref, base, atol=1e-4)
    rec.meta["source"] = "base"  # relative, as a user may type it
    rec.save(tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    monkeypatch.chdir("/")
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "lora"), dtype=torch.float32).eval()
    assert_close(logits(loaded), ref, 1e-5)
    SoftPrompt(torch.randn(4, 64), {"base_model": str(tmp_path / "base")}).save(tmp_path / "sp")
    cfg = json.loads((tmp_path / "sp" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((tmp_path / "base").resolve())


@pytest.mark.slow
@pytest.mark.parametrize("fmt,rel", [("compressed-tensors", 1e-5), ("gguf", 2e-3), ("hf", 1e-5)])
def test_real_model_exports_match_recoup(tmp_path, fmt, rel):
    """smollm2-135m, RTN 4-bit sym groups of 64 (a Q4_0 grid): each destination's logits match recoup's."""
    from transformers import AutoTokenizer

    from recoup.artifact import load_model

    lm = load_model("smollm2-135m")
    rep = compress(lm, CompressConfig(method="rtn", bits=4, group_size=64), None)
    art = load_artifact(save_artifact(lm, rep, tmp_path / "art"))
    res = run_export(art, tmp_path, fmt)
    x = art.tokenizer(["The capital of France is Paris, and the capital of Italy is"], return_tensors="pt").input_ids
    kw = {"gguf_file": "model.gguf"} if fmt == "gguf" else {}
    m = AutoModelForCausalLM.from_pretrained(res["out"], dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        ref, got = art.model(x).logits, m(x).logits
    assert_close(got, ref, rel)
    if fmt == "gguf":
        assert res["plan"]["linear_type"] == "Q4_0" and res["tensor_types"]["Q4_0"] == 210
        tok = AutoTokenizer.from_pretrained(res["out"], gguf_file="model.gguf")
        text = "Deploy 3 models: 12,345 tokens/s!"
        assert tok(text)["input_ids"] == art.tokenizer(text)["input_ids"]


def test_soft_prompt_beside_export_loads_with_peft(tmp_path):
    """A recoup soft prompt exported beside an hf export: PEFT's prompt tuning gives recoup's logits."""
    from peft import AutoPeftModelForCausalLM

    from recoup.model.forward import forward_logits
    from recoup.recover.soft_prompt import SoftPrompt

    art = artifact(tmp_path, method="sparsegpt", sparsity=0.5, bits=4, group_size=32)
    sp = SoftPrompt(
        torch.randn(5, 64, generator=torch.Generator().manual_seed(0)) * 0.02,
        {"base_model": str(art.path), "num_attention_heads": 4, "num_layers": 2},
    )
    sp.save(tmp_path / "sp")
    res = run_export(art, tmp_path, "hf", recovery=str(tmp_path / "sp"))
    m = AutoPeftModelForCausalLM.from_pretrained(res["recovery"], dtype=torch.float32).eval()
    with torch.no_grad():
        got = m(input_ids=X).logits[:, sp.tokens :]
        ref = forward_logits(art.model, X, None, sp.prefix(art.model, X, torch.ones_like(X)))
    assert_close(got.float(), ref.float(), 1e-5)

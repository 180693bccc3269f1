"""Lazy weights: a skeleton model whose decoder layers are read from the checkpoint one at a time, compressed,
written and freed, must give the artifact the whole-model path gives (same files byte for byte, same manifest
but for timings), read every checkpoint tensor once and hold one layer at a time."""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys

import pytest
import torch
from helpers import needs_packs, save_tiny

from recoup.artifact.layerwise import merge_safetensors
from recoup.artifact.store import load_qparams
from recoup.compress import CompressConfig, compress
from recoup.data.calibration import Calibration
from recoup.model.lazy import load_lazy
from recoup.runs import stages

TIMINGS = ("created", "seconds", "peak_rss_mb", "manifest_sha256")


def test_merge_writes_what_save_file_writes(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.w": torch.randn(3, 5, generator=g),
        "a.scale": torch.randn(4, generator=g).half(),
        "z.codes": torch.randint(0, 255, (7,), generator=g).to(torch.uint8),
        "m.bf": torch.randn(2, 3, generator=g).bfloat16(),
        "i": torch.arange(3),
        "mask": torch.tensor([True, False]),
        "i32": torch.arange(5, dtype=torch.int32),
        "d": torch.randn(2, dtype=torch.float64, generator=g),
        "e": torch.zeros(0),
    }
    names = sorted(tensors)
    random.Random(0).shuffle(names)
    sources = {}
    for k, part in enumerate((names[:4], names[4:])):
        f = tmp_path / f"part{k}.safetensors"
        save_file({n: tensors[n] for n in part}, str(f))
        sources.update({n: f for n in part})
    save_file(tensors, str(tmp_path / "want.safetensors"), metadata={"format": "pt"})
    merge_safetensors(tmp_path / "got.safetensors", sources, {"format": "pt"})
    assert (tmp_path / "got.safetensors").read_bytes() == (tmp_path / "want.safetensors").read_bytes()


def _corpus(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text(" ".join(f"the {w} of word {i}." for i, w in enumerate(["cat", "dog", "sea", "sky"] * 200)))
    return str(f)


def _compress(tmp_path, src, out, lazy: bool, **keys) -> dict:
    return stages.compress(
        stages.CompressJob.from_flat(
            {
                "model": str(src),
                "out": str(out),
                "calib": _corpus(tmp_path),
                "nsamples": 4,
                "seqlen": 32,
                "device": "cpu",
                "lazy": lazy,
                **keys,
            }
        )
    )


def _manifest(path) -> dict:
    m = json.loads((path / "recoup.json").read_text())
    for k in TIMINGS:
        m.pop(k, None)
    for rec in m["layers"]:
        rec.pop("seconds")
    return m


RECIPES = {
    "wanda": dict(method="wanda", sparsity=0.5),
    "gptq": dict(method="gptq", bits=4, group_size=16),
    "rtn-dense": dict(method="rtn", bits=4, group_size=16, storage="dense"),
    "sparsegpt": dict(method="sparsegpt", sparsity=0.5, bits=4, group_size=16),
    "awq": dict(method="awq", bits=4, group_size=16),
}


@pytest.mark.parametrize(
    "arch,recipe,dtype",
    [
        ("llama", "wanda", torch.bfloat16),
        ("llama", "gptq", torch.float32),
        ("llama", "rtn-dense", torch.bfloat16),
        ("gpt2", "sparsegpt", torch.float32),
        ("opt", "awq", torch.bfloat16),
        ("qwen3", "gptq", torch.bfloat16),
    ],
)
def test_lazy_artifact_is_the_whole_model_artifact(tmp_path, arch, recipe, dtype):
    src = tmp_path / "src"
    lm = save_tiny(src, arch, hidden=32, layers=3)
    if dtype != torch.float32:  # a half-precision checkpoint, as hub checkpoints are
        lm.model.to(dtype).save_pretrained(str(src))
    eager, lazy = tmp_path / "eager", tmp_path / "lazy"
    _compress(tmp_path, src, eager, False, **RECIPES[recipe])
    _compress(tmp_path, src, lazy, True, **RECIPES[recipe])
    files = sorted(f.name for f in eager.iterdir())
    assert files == sorted(f.name for f in lazy.iterdir())
    for name in files:
        if name != "recoup.json":
            assert (eager / name).read_bytes() == (lazy / name).read_bytes(), name
    assert _manifest(eager) == _manifest(lazy)
    assert _manifest(lazy)["summary"]["linears"] == 3 * 7 or arch in ("gpt2", "opt")


@pytest.mark.parametrize("recipe", ["wanda", "sparsegpt"])
def test_artifact_is_the_same_when_written_in_small_blocks(tmp_path, monkeypatch, recipe):
    """Big tensors are packed, checked and converted a block of rows (or a chunk of values) at a time: the
    embedding read from a bf16 checkpoint into the artifact's float32, Wanda's ranking, the packed codes and
    masks. Tiny models fit one block, so the blocks are made small here (several per tensor): the artifact is
    byte for byte the one written in whole-tensor blocks."""
    from recoup import blocks
    from recoup.artifact import packing

    src = tmp_path / "src"
    lm = save_tiny(src, "llama", hidden=32, layers=2)
    lm.model.to(torch.bfloat16).save_pretrained(str(src))
    whole = tmp_path / "whole"
    _compress(tmp_path, src, whole, True, **RECIPES[recipe])
    monkeypatch.setattr(blocks, "ROW_BLOCK_ELEMENTS", 3 * 32)  # 3 rows of a 32-column matrix a block
    monkeypatch.setattr(packing, "PACK_CHUNK", 40)
    small = tmp_path / "small"
    _compress(tmp_path, src, small, True, **RECIPES[recipe])
    files = sorted(f.name for f in whole.iterdir())
    assert files == sorted(f.name for f in small.iterdir())
    for name in files:
        if name != "recoup.json":
            assert (whole / name).read_bytes() == (small / name).read_bytes(), name
    a, b = _manifest(whole), _manifest(small)  # the relative errors sum per block: equal to float32 rounding
    errors = [(r.pop("error"), q.pop("error")) for r, q in zip(a["layers"], b["layers"])]
    errors.append((a["summary"].pop("mean_error"), b["summary"].pop("mean_error")))
    assert a == b and all(x == pytest.approx(y, rel=1e-5) for x, y in errors)


def _calib(n=4, t=16) -> Calibration:
    ids = torch.randint(4, 100, (n, t), generator=torch.Generator().manual_seed(0))
    return Calibration(input_ids=ids, corpus="random", split="train", seqlen=t, seed=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lazy_reads_each_tensor_once_and_holds_one_layer(tmp_path, arch):
    save_tiny(tmp_path / "src", arch, hidden=32, layers=3)
    loaded, weights = load_lazy(str(tmp_path / "src"))
    assert all(p.device.type == "meta" for p in loaded.model.parameters())
    layers_key = "model.layers" if arch == "llama" else "transformer.h"
    alive_at: list[list[str]] = []

    def on_layer(i, layer, names, qparams):
        alive_at.append(sorted(weights.alive()))
        assert all(p.device.type == "cpu" for p in layer.parameters())

    compress(
        loaded,
        CompressConfig.from_dict({"method": "sparsegpt", "sparsity": 0.5}),
        _calib(),
        weights=weights,
        on_layer=on_layer,
    )
    assert weights.alive() == []  # everything freed
    assert all(p.device.type == "meta" for p in loaded.model.parameters())
    for i, alive in enumerate(alive_at):  # at each layer's peak: that layer's tensors and nothing else
        want = sorted(k for k in weights.files if k.startswith(f"{layers_key}.{i}."))
        assert alive == want and want
    layer_keys = [k for k in weights.files if k.startswith(layers_key + ".")]
    assert {k: weights.reads[k] for k in layer_keys} == {k: 1 for k in layer_keys}
    # only what runs before the first layer (embeddings) was read besides the layers, once
    assert all(n == 1 for n in weights.reads.values())
    assert not any(
        k in weights.reads
        for k in weights.files
        if "norm" in k and not k.startswith(layers_key) or k.startswith("lm_head") or "ln_f" in k
    )


def test_grids_are_spooled_with_their_layer(tmp_path, monkeypatch):
    """The layer-by-layer writer takes each layer's quantization grids out of memory with the layer: when a
    layer is written, the grids held are that layer's alone (they used to pile up until the artifact was
    finished, ~13 MB a layer of an 8B model); the grids file is still the whole-model one (test above)."""
    from recoup.artifact.layerwise import LayerwiseWriter

    src = tmp_path / "src"
    save_tiny(src, "llama", hidden=32, layers=3)
    held: list[list[str]] = []
    add = LayerwiseWriter.add_layer

    def add_layer(self, i, layer, names, qparams):
        held.append(sorted(qparams))
        add(self, i, layer, names, qparams)
        held.append(sorted(qparams))

    monkeypatch.setattr(LayerwiseWriter, "add_layer", add_layer)
    out = tmp_path / "out"
    _compress(tmp_path, src, out, True, **RECIPES["gptq"])
    assert len(held) == 6
    for i in range(3):
        at, after = held[2 * i], held[2 * i + 1]
        assert len(at) == 7 and all(n.startswith(f"model.layers.{i}.") for n in at)
        assert after == []
    assert len(load_qparams(out)) == 21


@pytest.mark.slow
@needs_packs  # PTB calibration
@pytest.mark.parametrize("recipe", ["wanda", "gptq"])
def test_lazy_artifact_is_the_whole_model_artifact_on_the_bundled_model(tmp_path, recipe):
    from recoup.model.load import bundled_model_dir

    if not (bundled_model_dir() / "config.json").is_file():
        pytest.skip("the bundled model is not set up (recoup setup)")
    keys = {**RECIPES[recipe], "calib": "ptb", "nsamples": 2, "seqlen": 64, "device": "cpu"}
    from recoup.compress.obs import single_thread

    # one thread: a multi-threaded matmul may sum in another order when the two paths' tensors sit differently in
    # memory, and this comparison is bit for bit (as the OBS loop's test does)
    with single_thread():
        for out, lazy in ((tmp_path / "eager", False), (tmp_path / "lazy", True)):
            job = stages.CompressJob.from_flat({"model": "smollm2-135m", "out": str(out), "lazy": lazy, **keys})
            stages.compress(job)
    eager, lazy = tmp_path / "eager", tmp_path / "lazy"
    for name in sorted(f.name for f in eager.iterdir()):
        if name != "recoup.json":
            assert (eager / name).read_bytes() == (lazy / name).read_bytes(), name
    assert _manifest(eager) == _manifest(lazy)


PATTERN = """
import ctypes, sys, torch
from recoup.memory import return_freed_tensors_to_the_system
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
if sys.argv[1] == "fixed":
    assert return_freed_tensors_to_the_system()
p = libc.malloc(30 * 2**20); libc.memset(p, 1, 30 * 2**20); libc.free(p)  # raises the dynamic threshold to 30 MB
base, keep = rss(), []
for i in range(20):  # what a layer does: large buffers come and go while small ones stay
    n = 8 * 2**20 + i * 2**16
    p = libc.malloc(n); libc.memset(p, 1, n)
    keep.append(libc.malloc(4096))
    libc.free(p)
grew = rss() - base
_ = torch.ones(8 * 2**20 // 4).add_(1)  # warm-up first: torch's thread pool and first-use buffers stay
del _
base = rss()
for i in range(20):  # the same with torch's CPU allocator
    t = torch.ones((8 * 2**20 + i * 2**16) // 4)
    keep.append(torch.ones(1000))
    del t
print(grew, rss() - base)
"""


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or not os.path.exists("/proc/self/statm"), reason="glibc's allocator on Linux"
)
def test_freed_layer_tensors_go_back_to_the_system():
    """Lazy weights fix glibc's mmap threshold: large buffers freed among small live ones leave the process's
    memory where it was; glibc's default keeps some of them (the growth per layer seen on 8B shapes)."""

    def growth(mode: str) -> list[float]:
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
        out = subprocess.run([sys.executable, "-c", PATTERN, mode], capture_output=True, text=True, env=env, check=True)
        return [float(x) for x in out.stdout.split()]

    assert growth("default")[0] > 4  # the pattern does grow without the setting (else this test would prove nothing)
    assert max(growth("fixed")) < 2


TRIM = """
import sys
from recoup.memory import trim_heap
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
base = rss()
junk, keep = [], []
for i in range(12_500):  # runs of malloc-sized objects (past Python's small-object arenas), as a tokenizer's,
    junk.extend(bytes(1000) for _ in range(20))
    keep.append(bytes(700))  # with a live one after each run: the freed runs are holes, not the heap's top
grown = rss() - base
del junk
kept = rss() - base
done = trim_heap()
print(grown, kept, rss() - base, done)
"""


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or not os.path.exists("/proc/self/statm"), reason="glibc's allocator on Linux"
)
def test_trim_heap_gives_freed_small_objects_back():
    """Tokenizing a corpus frees millions of small objects, which glibc keeps resident (0.5 GB for PTB train);
    ``trim_heap`` gives them back, as recoup does after tokenizing and after each lazily read layer."""
    out = subprocess.run([sys.executable, "-c", TRIM], capture_output=True, text=True, check=True)
    grown, kept, trimmed, done = out.stdout.split()
    assert done == "True" and float(grown) > 100
    assert float(kept) > 0.5 * float(grown)  # freed but still resident: what the trim is for
    assert float(trimmed) < 0.3 * float(grown)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux /proc")
def test_peak_memory_is_the_process_own_not_its_parents():
    """A process started by fork and exec inherits its parent's ru_maxrss; the peak recoup records (the artifact's
    peak_rss_mb, the per-layer log, a stage's record) is the process's own high-water mark."""
    big = bytearray(1024 * 2**20)  # the parent touches 1 GiB before it starts the child
    big[::4096] = b"\1" * len(range(0, len(big), 4096))
    code = "import resource; from recoup.artifact.report import peak_rss_mb; "
    code += "print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    del big
    own, inherited = float(out[0]), float(out[1])
    assert inherited > 1024  # the premise: ru_maxrss carries the parent's peak
    assert own < 700  # python, torch and recoup's import

"""Calibration activations within a budget: the compression engine's activations stored narrower
(``activation_dtype``) or in a memory-mapped temporary file (``activation_budget_mb``).

A file changes where the activations live, not a value: the artifact is the in-memory one byte for byte, while
the streamer holds no more than the budget in memory. bfloat16 / float16 round each layer's inputs, so their
artifact is close to float32's, not equal."""

from __future__ import annotations

import gc
import json
import os
import tempfile

import pytest
import torch
from helpers import save_tiny, tiny_loaded

import recoup.artifact
import recoup.model.lazy
from recoup.cli import main
from recoup.compress import CompressConfig, compress, engine
from recoup.data.calibration import Calibration
from recoup.errors import RecoupError
from recoup.model.anatomy import anatomy
from recoup.model.streamer import LayerStreamer
from recoup.runs import stages

# 72 windows x 128 tokens x hidden 64: 2.25 MiB of activations in float32, 1.125 MiB in bfloat16, over a 1 MiB budget
NSAMPLES, SEQLEN, HIDDEN = 72, 128, 64
TIMINGS = ("created", "seconds", "peak_rss_mb", "manifest_sha256")


@pytest.fixture
def tmpdir_for_files(tmp_path, monkeypatch):
    """The temporary folder the activations' file goes to (``TMPDIR``), empty to start with."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def streamers(monkeypatch):
    """Every LayerStreamer the engine makes, to read what it held."""
    made: list[LayerStreamer] = []

    class Recorded(LayerStreamer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(engine, "LayerStreamer", Recorded)
    return made


def _corpus(tmp_path) -> str:
    f = tmp_path / "calib.txt"
    f.write_text(" ".join(f"the {w} of word {i}." for i, w in enumerate(["cat", "dog", "sea", "sky"] * 200)))
    return str(f)


def _compress(tmp_path, src, out, **keys) -> dict:
    return stages.compress(
        stages.CompressJob.from_flat(
            {
                "model": str(src),
                "out": str(out),
                "calib": _corpus(tmp_path),
                "nsamples": NSAMPLES,
                "seqlen": SEQLEN,
                "device": "cpu",
                "batch_size": 8,
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


def _leftovers(folder) -> list:
    return [p for p in folder.iterdir() if p.name.startswith("recoup-activations-")]


def _mapped_rss_kb(address: int) -> int:
    """Resident KiB of the activations file mapped at ``address`` (Linux's smaps)."""
    ours = False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split(" ", 1)[0]
            if "-" in head:  # a mapping's header line: address range, perms, ..., path
                ours = int(head.split("-")[0], 16) == address and "recoup-activations-" in line
            elif ours and line.startswith("Rss:"):
                return int(line.split()[1])
    raise AssertionError("the activations file is not mapped")


def _mapped_files() -> list[str]:
    with open("/proc/self/maps") as fh:
        return [line for line in fh if "recoup-activations-" in line]


@pytest.mark.parametrize(
    "recipe",
    [dict(method="wanda", sparsity=0.5), dict(method="gptq", bits=4, group_size=16)],
    ids=["wanda", "gptq"],
)
@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_a_file_gives_the_in_memory_artifact_and_holds_less_than_the_budget(
    tmp_path, tmpdir_for_files, streamers, recipe, dtype
):
    src = tmp_path / "src"
    save_tiny(src, "llama", hidden=HIDDEN, layers=2)
    mem, spill = tmp_path / "mem", tmp_path / "spill"
    _compress(tmp_path, src, mem, activation_dtype=dtype, **recipe)
    _compress(tmp_path, src, spill, activation_dtype=dtype, activation_budget_mb=1, **recipe)
    in_memory, in_file = streamers
    size = 2 if dtype == "bfloat16" else 4
    assert not in_memory.spilled and in_memory.peak_bytes >= NSAMPLES * SEQLEN * HIDDEN * size
    assert in_file.spilled and 0 < in_file.peak_bytes <= 2**20  # one batch in and out, not the activations
    assert in_file.inps is None and _leftovers(tmpdir_for_files) == []  # freed, the folder removed
    files = sorted(f.name for f in mem.iterdir())
    assert files == sorted(f.name for f in spill.iterdir())
    for name in files:
        if name != "recoup.json":
            assert (mem / name).read_bytes() == (spill / name).read_bytes(), name
    a, b = _manifest(mem), _manifest(spill)
    assert b["recipe"]["activation_budget_mb"] == 1 and b["calibration"]["activation_storage"] == "file"
    assert a["calibration"]["activation_storage"] == "memory"
    assert (
        a["calibration"]["activation_dtype"]
        == b["calibration"]["activation_dtype"]
        == ("bfloat16" if dtype == "bfloat16" else "float32")
    )
    for m in (a, b):
        m["recipe"].pop("activation_budget_mb")
        m["calibration"].pop("activation_storage")
    assert a == b


def _calib(n=16, t=32, seed=0) -> Calibration:
    ids = torch.randint(4, 100, (n, t), generator=torch.Generator().manual_seed(seed))
    return Calibration(input_ids=ids, corpus="random", split="train", seqlen=t, seed=seed)


@pytest.mark.parametrize(
    "recipe",
    [dict(method="wanda", sparsity=0.5), dict(method="gptq", bits=4, group_size=16)],
    ids=["wanda", "gptq"],
)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_narrower_activations_give_an_artifact_close_to_float32s(streamers, recipe, dtype):
    x = _calib(2, 16, seed=9).input_ids
    out = {}
    for key, name, seed in (("float32", "auto", 0), ("narrow", dtype, 0), ("other windows", "auto", 1)):
        lm = tiny_loaded("llama", hidden=64, layers=3)
        rep = compress(lm, CompressConfig.from_dict({**recipe, "activation_dtype": name}), _calib(seed=seed))
        with torch.no_grad():
            out[key] = (rep, lm.model(x).logits)
    assert streamers[1].compute_dtype == torch.float32  # stored narrow, computed in the layers' float32
    (rep32, logits32), (narrow, logits16), (_, other) = out["float32"], out["narrow"], out["other windows"]
    assert rep32.calibration["activation_dtype"] == "float32" and narrow.calibration["activation_dtype"] == dtype
    # the rounding is real (the layers saw other inputs) but moves the artifact less than drawing other
    # calibration windows does, and leaves its reconstruction error as it was
    assert 0 < (logits16 - logits32).norm() < (other - logits32).norm()
    assert abs(narrow.mean_error - rep32.mean_error) < 0.02 * rep32.mean_error


def test_streamer_in_a_file_walks_to_the_same_activations(tmpdir_for_files):
    n, t, hidden, b = 64, 64, 64, 4  # 1 MiB of float32 activations in batches of 64 KiB
    lm = tiny_loaded("llama", hidden=hidden, layers=3)
    ids = _calib(n, t).input_ids
    total, batch = n * t * hidden * 4, b * t * hidden * 4
    smaps = os.path.exists("/proc/self/smaps")  # Linux

    def walk(**kwargs) -> tuple[torch.Tensor, LayerStreamer]:
        s = LayerStreamer(lm.model, **kwargs)
        s.capture(ids, b)
        with torch.no_grad():
            for i in range(s.num_layers):
                with s.layer(i):
                    s.run(i, b)
                    s.propagate(i, b)
        if smaps and s.spilled:  # the file is mapped, but its pages do not stay in this process's memory: what
            # is left is the kernel's fault-around of the last read (at most 64 KiB), not the 1 (0.5) MiB file
            assert _mapped_rss_kb(s.inps.data_ptr()) * 1024 <= 2 * 65536
        return s.inps.clone(), s

    want, mem = walk()
    got, spilled = walk(budget_bytes=total - 1)  # one byte short of the activations
    assert spilled.spilled and not mem.spilled and torch.equal(got, want)
    assert spilled.peak_bytes == 2 * batch  # a batch in, its output out
    assert mem.peak_bytes == total + batch  # the activations, plus a batch's output
    narrow, bf16 = walk(activation_dtype=torch.bfloat16, budget_bytes=0)
    assert bf16.inps.dtype == torch.bfloat16 and narrow.dtype == torch.bfloat16
    torch.testing.assert_close(narrow.float(), want, rtol=0.05, atol=0.05)
    spilled.close()
    bf16.close()
    gc.collect()
    if smaps:
        assert _mapped_files() == []  # unmapped once the activations are freed
    assert _leftovers(tmpdir_for_files) == []


def test_an_error_mid_pass_leaves_no_file(tmpdir_for_files, streamers):
    lm = tiny_loaded("llama", hidden=32, layers=3)

    def interrupt(*_args):
        if streamers[0].spilled:  # past the capture, with the activations in their file: a Ctrl-C
            raise KeyboardInterrupt

    boom = anatomy(lm.model).layers[1].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        compress(lm, CompressConfig(method="wanda", sparsity=0.5, activation_budget_mb=0), _calib())
    boom.remove()
    assert streamers[0].spilled and streamers[0].inps is None
    gc.collect()
    assert _leftovers(tmpdir_for_files) == []
    if os.path.exists("/proc/self/maps"):
        assert _mapped_files() == []


def test_float16_overflow_is_one_line():
    lm = tiny_loaded("llama", hidden=32, layers=2)
    with torch.no_grad():
        anatomy(lm.model).embed.weight.mul_(1e8)  # first-layer inputs far past float16's 65504
    with pytest.raises(RecoupError, match="float16's range"):
        compress(lm, CompressConfig(method="wanda", sparsity=0.5, activation_dtype="float16"), _calib())


@pytest.mark.parametrize(
    "flag,needle",
    [
        (["--activation-dtype", "int8"], "unknown activation_dtype 'int8'"),
        (["--activation-dtype", "bfloat"], "did you mean 'bfloat16'"),
        (["--activation-budget-mb", "-1"], "activation_budget_mb must be"),
    ],
)
def test_bad_values_exit_2_before_the_model_loads(tmp_path, monkeypatch, capsys, flag, needle):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded for input that alone shows the mistake")

    monkeypatch.setattr(recoup.model.lazy, "load_lazy", refuse)
    monkeypatch.setattr(recoup.artifact, "load_model", refuse)
    argv = ["compress", "smollm2-135m", "--method", "wanda", "--sparsity", "0.5", "--out", str(tmp_path / "o")]
    assert main(argv + flag) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], lines

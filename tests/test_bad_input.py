"""Bad and hostile input, command by command: exit code 2, exactly one line on stderr, no traceback, and
(for every case in CASES) refused before any model was loaded: the loaders are replaced by functions that
fail the test if called. Cases run in-process through ``recoup.cli.main``."""

from __future__ import annotations

import fcntl
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from helpers import _packs_present, save_tiny, tiny_loaded
from safetensors.torch import save_file

import recoup.artifact
import recoup.artifact.store
import recoup.model.load
from recoup.cli import main

VALID_RECIPE = """name: tiny
model: smollm2-135m
evaluate:
  tasks: [ppl:ptb]
  limit: 1
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every bad file the cases name, made once."""
    d = tmp_path_factory.mktemp("bad")
    (d / "latin1.txt").write_bytes("caf\xe9 na\xefve r\xe9sum\xe9 text\n".encode("latin-1") * 20)
    (d / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (d / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (d / "utf16.txt").write_bytes("hello world\n".encode("utf-16"))
    (d / "empty.txt").write_text("")
    (d / "good.txt").write_text("plain text for a corpus. " * 40)
    (d / "bad.jsonl").write_text("not json\n")
    (d / "nofield.jsonl").write_text('{"body": "x"}\n')
    (d / "empty.yaml").write_text("")
    (d / "comments.yaml").write_text("# nothing but a comment\n")
    (d / "nostage.yaml").write_text("name: x\nmodel: smollm2-135m\nevaluate: {dense: false}\n")
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "badyaml.yaml").write_text("name: [unclosed\n")
    (d / "unknownkey.yaml").write_text(VALID_RECIPE + "bogus: 1\n")
    (d / "badmethod.yaml").write_text(
        "name: x\nmodel: smollm2-135m\ncompress:\n  - {name: c, method: sparsgpt, sparsity: 0.5}\n"
    )
    (d / "badsparsity.yaml").write_text(
        "name: x\nmodel: smollm2-135m\ncompress:\n  - {name: c, method: magnitude, sparsity: 1.5}\n"
    )
    (d / "badgroup.yaml").write_text(
        "name: x\nmodel: smollm2-135m\ncompress:\n  - {name: c, method: gptq, bits: 4, group_size: 0}\n"
    )
    (d / "badbatch.yaml").write_text(VALID_RECIPE.replace("limit: 1", "limit: 1\n  batch_size: 0"))
    (d / "badshots.yaml").write_text(VALID_RECIPE.replace("limit: 1", "limit: 1\n  options: {shots: abc}"))
    (d / "badcorpus.yaml").write_text(VALID_RECIPE.replace("ppl:ptb", "ppl:ptbb"))
    (d / "latincorpus.yaml").write_text(VALID_RECIPE.replace("ppl:ptb", f"ppl:{d / 'latin1.txt'}"))
    (d / "badmodel.yaml").write_text(VALID_RECIPE.replace("smollm2-135m", "smollm2-135"))
    (d / "ok.yaml").write_text(VALID_RECIPE)
    (d / "results.json").write_text(json.dumps({"results": {"ppl:ptb": {"ppl": 10.0}}}))
    (d / "notresults.json").write_text("[1, 2]")
    (d / "store.sqlite").write_bytes(b"this is not a sqlite file at all" * 10)
    (d / "afile").write_text("x")
    (d / "full").mkdir()
    (d / "full" / "x.txt").write_text("not recoup's")
    (d / "notrecovery").mkdir()
    nan = d / "nan_recovery"
    nan.mkdir()
    (nan / "recoup_recovery.json").write_text(json.dumps({"method": "soft-prompt"}))
    save_file({"prompt_embeddings": torch.tensor([[1.0, float("nan")]])}, str(nan / "adapter_model.safetensors"))
    inf = d / "inf_recovery"
    inf.mkdir()
    (inf / "recoup_recovery.json").write_text(json.dumps({"method": "soft-prompt"}))
    save_file({"prompt_embeddings": torch.tensor([[float("inf"), 0.0]])}, str(inf / "adapter_model.safetensors"))
    (d / "locked").mkdir()
    return d


# (id, argv with {d} = the files directory, a phrase of the expected line)
CASES = [
    # compress
    (
        "compress-latin1-calib",
        "compress smollm2-135m --method magnitude --sparsity 0.5 --calib {d}/latin1.txt --out {d}/o",
        "not UTF-8",
    ),
    (
        "compress-binary-calib",
        "compress smollm2-135m --method wanda --sparsity 0.5 --calib {d}/binary.txt --out {d}/o",
        "binary file",
    ),
    (
        "compress-utf16-calib",
        "compress smollm2-135m --method wanda --sparsity 0.5 --calib {d}/utf16.txt --out {d}/o",
        "not UTF-8",
    ),
    (
        "compress-empty-calib",
        "compress smollm2-135m --method wanda --sparsity 0.5 --calib {d}/empty.txt --out {d}/o",
        "is empty",
    ),
    (
        "compress-missing-calib",
        "compress smollm2-135m --method wanda --sparsity 0.5 --calib {d}/nope.txt --out {d}/o",
        "file not found",
    ),
    (
        "compress-unknown-corpus",
        "compress smollm2-135m --method wanda --sparsity 0.5 --calib ptbb --out {d}/o",
        "did you mean 'ptb'",
    ),
    ("compress-group-size-0", "compress smollm2-135m --method gptq --bits 4 --group-size 0 --out {d}/o", "group"),
    (
        "compress-scale-search-bad",
        "compress smollm2-135m --method gptq --bits 4 --scale-search l1 --out {d}/o",
        "scale_search",
    ),
    (
        "compress-scale-search-no-bits",
        "compress smollm2-135m --method wanda --sparsity 0.5 --scale-search mse --out {d}/o",
        "scale_search",
    ),
    ("compress-group-size-neg", "compress smollm2-135m --method gptq --bits 4 --group-size -2 --out {d}/o", "group"),
    ("compress-bits-3.5", "compress smollm2-135m --method gptq --bits 3.5 --out {d}/o", "invalid int"),
    ("compress-sparsity-1.5", "compress smollm2-135m --method magnitude --sparsity 1.5 --out {d}/o", "sparsity"),
    (
        "compress-unknown-method",
        "compress smollm2-135m --method sparsgpt --sparsity 0.5 --out {d}/o",
        "did you mean 'sparsegpt'",
    ),
    ("compress-nsamples-0", "compress smollm2-135m --method wanda --sparsity 0.5 --nsamples 0 --out {d}/o", "nsamples"),
    (
        "compress-batch-size-0",
        "compress smollm2-135m --method wanda --sparsity 0.5 --batch-size 0 --out {d}/o",
        "batch_size",
    ),
    ("compress-seqlen-1", "compress smollm2-135m --method wanda --sparsity 0.5 --seqlen 1 --out {d}/o", "seqlen"),
    ("compress-out-file", "compress smollm2-135m --method magnitude --sparsity 0.5 --out {d}/afile", "is a file"),
    ("compress-out-nonempty", "compress smollm2-135m --method magnitude --sparsity 0.5 --out {d}/full", "not empty"),
    (
        "compress-out-readonly",
        "compress smollm2-135m --method magnitude --sparsity 0.5 --out /proc/recoup-x",
        "not writable",
    ),
    ("compress-cuda", "compress smollm2-135m --method magnitude --sparsity 0.5 --device cuda --out {d}/o", "cuda"),
    (
        "compress-bad-dtype",
        "compress smollm2-135m --method magnitude --sparsity 0.5 --dtype float8 --out {d}/o",
        "dtype",
    ),
    (
        "compress-typo-model",
        "compress smollm2-135 --method magnitude --sparsity 0.5 --out {d}/o",
        "did you mean 'smollm2-135m'",
    ),
    (
        "compress-missing-model",
        "compress ./no/such/model --method magnitude --sparsity 0.5 --out {d}/o",
        "no such file",
    ),
    # eval
    ("eval-latin1-ppl", "eval smollm2-135m --tasks ppl:{d}/latin1.txt", "not UTF-8"),
    ("eval-binary-ppl", "eval smollm2-135m --tasks ppl:{d}/binary.txt", "binary file"),
    ("eval-empty-tasks", "eval smollm2-135m --tasks ''", "empty"),
    ("eval-unknown-task", "eval smollm2-135m --tasks arc_esay", "did you mean"),
    ("eval-unknown-corpus", "eval smollm2-135m --tasks ppl:ptbb", "unknown corpus"),
    ("eval-bad-ppl-syntax", "eval smollm2-135m --tasks ppl:", "bad perplexity task"),
    ("eval-shots-abc", "eval smollm2-135m --tasks ppl:ptb --option shots=abc", "shots must be an integer"),
    ("eval-shots-negative", "eval smollm2-135m --tasks ppl:ptb --option shots=-1", "at least 0"),
    ("eval-chat-maybe", "eval smollm2-135m --tasks ppl:ptb --option chat=maybe", "true or false"),
    ("eval-unknown-option", "eval smollm2-135m --tasks ppl:ptb --option shot=5", "did you mean 'shots'"),
    ("eval-option-no-equals", "eval smollm2-135m --tasks ppl:ptb --option shots", "KEY=VALUE"),
    (
        "eval-option-latin1-file",
        "eval smollm2-135m --tasks instructions --option instructions_file={d}/latin1.jsonl",
        "not UTF-8",
    ),
    ("eval-max-new-tokens-0", "eval smollm2-135m --option max_new_tokens=0", "at least 1"),
    ("eval-context-tokens-text", "eval smollm2-135m --option context_tokens=many", "must be an integer"),
    ("eval-batch-size-0", "eval smollm2-135m --batch-size 0", "batch_size"),
    ("eval-limit-0", "eval smollm2-135m --limit 0", "limit"),
    ("eval-seqlen-0", "eval smollm2-135m --seqlen 0", "seqlen"),
    ("eval-cuda", "eval smollm2-135m --device cuda", "cuda"),
    ("eval-typo-model", "eval smollm2-135 --limit 1", "did you mean 'smollm2-135m'"),
    ("eval-unknown-suite", "eval smollm2-135m --suite kik", "did you mean 'kick'"),
    (
        "eval-judge-key-unset",
        "eval smollm2-135m --judge-url http://127.0.0.1:9/v1 --judge-model m --judge-key-env RECOUP_TEST_UNSET_KEY",
        "is not set",
    ),
    (
        "eval-judge-key-empty",
        "eval smollm2-135m --judge-url http://127.0.0.1:9/v1 --judge-model m --judge-key-env RECOUP_TEST_EMPTY_KEY",
        "set but empty",
    ),
    ("eval-judge-no-model", "eval smollm2-135m --judge-url http://127.0.0.1:9/v1", "needs --judge-model"),
    ("eval-judge-bad-url", "eval smollm2-135m --judge-url ftp://x --judge-model m", "http://"),
    ("eval-judge-retries-0", "eval smollm2-135m --judge-retries 0", "judge_retries"),
    ("eval-recovery-missing", "eval smollm2-135m --recovery {d}/nope", "no recovery directory"),
    ("eval-recovery-not-one", "eval smollm2-135m --recovery {d}/notrecovery", "not a saved recovery"),
    ("eval-recovery-nan", "eval smollm2-135m --recovery {d}/nan_recovery", "holds NaN"),
    ("eval-recovery-inf", "eval smollm2-135m --recovery {d}/inf_recovery", "holds Inf"),
    ("eval-prompt-empty", "eval smollm2-135m --prompt-text ' '", "prompt_text is empty"),
    ("eval-limit-text", "eval smollm2-135m --limit x", "invalid int"),
    # recover
    ("recover-latin1-data", "recover smollm2-135m --method soft-prompt --data {d}/latin1.txt --out {d}/r", "not UTF-8"),
    (
        "recover-binary-data",
        "recover smollm2-135m --method soft-prompt --data {d}/binary.txt --out {d}/r",
        "binary file",
    ),
    ("recover-latin1-jsonl", "recover smollm2-135m --method lora --data {d}/latin1.jsonl --out {d}/r", "not UTF-8"),
    (
        "recover-batch-size-0",
        "recover smollm2-135m --method soft-prompt --data ptb --batch-size 0 --out {d}/r",
        "batch_size",
    ),
    ("recover-unknown-method", "recover smollm2-135m --method sof-prompt --out {d}/r", "did you mean"),
    ("recover-unknown-task", "recover smollm2-135m --method soft-prompt --task sciqq --out {d}/r", "did you mean"),
    ("recover-out-nonempty", "recover smollm2-135m --method soft-prompt --data ptb --out {d}/full", "not empty"),
    ("recover-cuda", "recover smollm2-135m --method soft-prompt --data ptb --device cuda --out {d}/r", "cuda"),
    ("recover-typo-model", "recover smollm2-135 --method soft-prompt --data ptb --out {d}/r", "did you mean"),
    ("recover-eora-energy", "recover smollm2-135m --method eora --energy 1.5 --out {d}/r", "--energy must be in"),
    # run (recipes) and sweep
    ("run-empty-recipe", "run {d}/empty.yaml", "empty"),
    ("run-comment-recipe", "run {d}/comments.yaml", "empty"),
    ("run-no-stage", "run {d}/nostage.yaml", "stage"),
    ("run-list-recipe", "run {d}/list.yaml", "mapping"),
    ("run-bad-yaml", "run {d}/badyaml.yaml", "YAML"),
    ("run-missing-recipe", "run {d}/nope.yaml", "nope.yaml"),
    ("run-unknown-key", "run {d}/unknownkey.yaml", "bogus"),
    ("run-bad-method", "run {d}/badmethod.yaml", "did you mean 'sparsegpt'"),
    ("run-bad-sparsity", "run {d}/badsparsity.yaml", "sparsity"),
    ("run-group-size-0", "run {d}/badgroup.yaml", "group"),
    ("run-batch-size-0", "run {d}/badbatch.yaml", "batch_size"),
    ("run-shots-abc", "run {d}/badshots.yaml", "shots must be an integer"),
    ("run-bad-corpus", "run {d}/badcorpus.yaml", "unknown corpus"),
    ("run-latin1-corpus", "run {d}/latincorpus.yaml", "not UTF-8"),
    ("run-typo-model", "run {d}/badmodel.yaml", "did you mean 'smollm2-135m'"),
    ("run-out-file", "run {d}/ok.yaml --out {d}/afile --store {d}/s.sqlite", "is a file"),
    ("run-out-foreign", "run {d}/ok.yaml --out {d}/full --store {d}/s.sqlite", "did not write"),
    ("run-out-foreign-dry", "run {d}/ok.yaml --out {d}/full --dry-run", "did not write"),
    ("run-out-readonly", "run {d}/ok.yaml --out /proc/recoup-run --store {d}/s.sqlite", "not writable"),
    ("run-locked", "run {d}/ok.yaml --out {d}/locked --store {d}/s.sqlite", "another recoup run"),
    ("run-bad-set", "run {d}/ok.yaml --set evaluate.limit", "KEY=VALUE"),
    ("run-bad-executor", "run {d}/ok.yaml --executor rayy --out {d}/ex --store {d}/s.sqlite", "executor"),
    ("sweep-no-sweep-section", "sweep {d}/ok.yaml", "no sweep section"),
    ("sweep-bad-method", "sweep --methods magnitud --dry-run", "did you mean 'magnitude'"),
    ("sweep-bad-sparsity", "sweep --sparsity 1.5 --dry-run", "sparsity"),
    # compare / compare-recovery
    ("compare-binary", "compare {d}/binary.txt {d}/results.json", "not UTF-8"),
    ("compare-latin1", "compare {d}/latin1.txt {d}/results.json", "not UTF-8"),
    ("compare-missing", "compare {d}/nope.json {d}/results.json", "no such results file"),
    ("compare-not-results", "compare {d}/notresults.json {d}/results.json", "not a recoup results file"),
    ("compare-directory", "compare {d}/full {d}/results.json", "directory"),
    ("compare-tolerance", "compare {d}/results.json {d}/results.json --tolerance 2", "tolerance"),
    ("compare-recovery-batch-0", "compare-recovery --task sciq --dense smollm2-135m --batch-size 0", "batch_size"),
    ("compare-recovery-typo-model", "compare-recovery --task sciq --dense smollm2-135", "did you mean"),
    (
        "compare-recovery-nan",
        "compare-recovery --task sciq --compressed smollm2-135m --recovery {d}/nan_recovery",
        "holds NaN",
    ),
    ("compare-recovery-nothing", "compare-recovery --task sciq", "nothing to compare"),
    (
        "compare-recovery-fraction",
        "compare-recovery --task sciq --dense smollm2-135m --heldout-fraction 1.5",
        "heldout_fraction",
    ),
    (
        "compare-recovery-include",
        "compare-recovery --task sciq --dense smollm2-135m --include {d}/binary.txt",
        "--include",
    ),
    # show / report / runs / setup
    ("show-bad-store", "show x --store {d}/store.sqlite", "not a usable results store"),
    ("show-unknown-run", "show nosuchrun --store {d}/s2.sqlite", "no run"),
    ("report-bad-store", "report x --store {d}/store.sqlite", "not a usable results store"),
    ("report-unknown-run", "report nosuchrun --store {d}/s2.sqlite", "no run"),
    ("runs-bad-store", "runs --store {d}/store.sqlite", "not a usable results store"),
    ("setup-unknown-flag", "setup --bogus", "unrecognized arguments"),
    ("unknown-command", "nosuchcommand", "invalid choice"),
]


def _forbid_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a model was loaded for input that alone shows the mistake: {args[:1]}")

    monkeypatch.setattr(recoup.artifact, "load_model", refuse)
    monkeypatch.setattr(recoup.artifact.store, "load_artifact", refuse)
    monkeypatch.setattr(recoup.model.load, "load_pretrained", refuse)
    monkeypatch.setattr(recoup.model.load, "convert_gguf", refuse)
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def _argv(template: str, d) -> list[str]:
    import shlex

    return shlex.split(template.format(d=d))


@pytest.mark.parametrize("case,template,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_before_any_model(case, template, needle, files, monkeypatch, capsys):
    if case == "compare-recovery-nan" and not _packs_present():  # the task split is read before the recovery
        pytest.skip("data packs not installed (run `recoup setup`)")
    monkeypatch.setenv("RECOUP_TEST_EMPTY_KEY", "")
    monkeypatch.delenv("RECOUP_TEST_UNSET_KEY", raising=False)
    _forbid_loading(monkeypatch)
    lock = None
    if case == "run-locked":  # another process holds the run directory
        lock = open(files / "locked" / ".recoup.lock", "a+")
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        try:
            code = main(_argv(template, files))
        except SystemExit as exc:  # argparse errors
            code = exc.code
    finally:
        if lock is not None:
            lock.close()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, f"exit {code}; stderr: {err}"
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert needle.lower() in lines[0].lower(), lines[0]


def test_enough_cases_across_every_command():
    by_command: dict[str, int] = {}
    for case, template, _ in CASES:
        by_command[template.split()[0]] = by_command.get(template.split()[0], 0) + 1
    assert len(CASES) >= 60
    for command in (
        "compress",
        "eval",
        "recover",
        "run",
        "sweep",
        "compare",
        "compare-recovery",
        "show",
        "report",
        "runs",
        "setup",
    ):
        assert by_command.get(command), command


# ---------------------------------------------------------------------------- after a model loaded


def test_non_finite_metric_fails_the_eval_and_json_is_strict(tmp_path, capsys):
    lm = save_tiny(tmp_path / "m")
    with torch.no_grad():
        lm.model.lm_head.weight.fill_(float("nan"))
    lm.model.save_pretrained(str(tmp_path / "m"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello there general kenobi. " * 30)
    out = tmp_path / "r.json"
    code = main(
        ["eval", str(tmp_path / "m"), "--tasks", f"ppl:{corpus}", "--seqlen", "32", "--limit", "2", "--json", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "not a finite number" in err
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    res = json.loads(text)["results"][f"ppl:{corpus}"]
    assert res["ppl"] is None and res["failed"].startswith("non-finite ppl")


def test_dumps_never_writes_bare_nan():
    from recoup.safeio import dumps

    text = dumps({"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": math.pi})
    assert json.loads(text) == {"a": None, "b": [None, None, 1.5], "c": math.pi}


def _artifact(tmp_path):
    from recoup.artifact.report import CompressReport, LinearRecord
    from recoup.artifact.store import save_artifact

    lm = tiny_loaded("llama")
    records = []
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"):
        w = dict(lm.model.named_modules())[name].weight
        with torch.no_grad():
            w[:, ::2] = 0
        records.append(LinearRecord(name, int(name.split(".")[2]), tuple(w.shape), 0.5, None, None, 0.0, "weight", 0.0))
    report = CompressReport(
        "magnitude", {"method": "magnitude", "sparsity": 0.5, "bits": None}, "llama", None, records, 0.0, 0.0
    )
    return save_artifact(lm, report, tmp_path / "art", storage="dense")


@pytest.mark.parametrize("edit", ["sparsity", "bits", "layers", "files"])
def test_edited_manifest_is_refused_with_one_line(tmp_path, edit, monkeypatch, capsys):
    art = _artifact(tmp_path)
    man = json.loads((art / "recoup.json").read_text())
    assert "manifest_sha256" in man
    if edit == "sparsity":
        man["summary"]["sparsity"] = 0.1
    elif edit == "bits":
        man["recipe"]["bits"] = 2
    elif edit == "layers":
        man["layers"] = man["layers"][:-1] + [{"name": "model.layers.0.mlp.up_proj"}]
    else:
        man["files"].pop(next(iter(man["files"])))
    (art / "recoup.json").write_text(json.dumps(man, indent=1))
    _forbid_loading(monkeypatch)
    capsys.readouterr()
    assert main(["eval", str(art), "--tasks", "ppl:ptb"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "was edited" in err


def test_old_manifest_without_digest_still_loads(tmp_path, caplog):
    from recoup.artifact.store import load_artifact

    art = _artifact(tmp_path)
    man = json.loads((art / "recoup.json").read_text())
    del man["manifest_sha256"]
    (art / "recoup.json").write_text(json.dumps(man, indent=1))
    loaded = load_artifact(art)
    assert loaded.manifest["summary"]["sparsity"] == 0.5
    assert "no manifest_sha256" in caplog.text


def test_nan_weight_in_artifact_is_named(tmp_path):
    from safetensors.torch import load_file

    from recoup.artifact.store import load_artifact, seal_manifest
    from recoup.errors import RecoupError
    from recoup.model.load import file_sha256

    art = _artifact(tmp_path)
    weights = load_file(str(art / "model.safetensors"))
    name = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[name][0, 0] = float("inf")
    save_file(weights, str(art / "model.safetensors"), metadata={"format": "pt"})
    man = json.loads((art / "recoup.json").read_text())
    man["files"]["model.safetensors"] = file_sha256(art / "model.safetensors")
    (art / "recoup.json").write_text(json.dumps(seal_manifest(man)))
    with pytest.raises(RecoupError, match=f"tensor '{name}' holds Inf"):
        load_artifact(art)


class EchoAuthServer:
    """A judge endpoint that answers every request with a malformed reply echoing its Authorization header."""

    def __enter__(self):
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                payload = f"bad gateway; you sent Authorization: {self.headers.get('Authorization')}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_judge_key_echoed_by_the_endpoint_is_never_written(tmp_path, monkeypatch, caplog, capsys):
    from recoup.recipe.jobs import EvalJob
    from recoup.runs.stages import evaluate
    from recoup.runs.store import Store

    secret = "sk-test-SECRET-0123456789abcdef"
    monkeypatch.setenv("RECOUP_TEST_JUDGE_KEY", secret)
    save_tiny(tmp_path / "m")
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "text": f"question {i}?"}) + "\n" for i in range(3)))
    with EchoAuthServer() as srv:
        job = EvalJob.from_flat(
            {
                "model": str(tmp_path / "m"),
                "tasks": ["instructions"],
                "limit": 2,
                "options": {"instructions_file": str(questions), "max_new_tokens": 2},
                "judge_url": srv.url,
                "judge_model": "m",
                "judge_key_env": "RECOUP_TEST_JUDGE_KEY",
                "judge_retries": 1,
                "json": str(tmp_path / "r.json"),
            }
        )
        with caplog.at_level("DEBUG"):
            out = evaluate(job)
    res = out["results"]["instructions"]
    assert "judge_error" in res and "Authorization" in (tmp_path / "r.json").read_text()  # the echo arrived
    with Store(tmp_path / "s.sqlite") as store:
        store.start_run("r", "r", {"k": 1}, "x", str(tmp_path))
        store.plan_stage("r", "e", 0, "evaluate", "k", str(tmp_path), {})
        store.stage_finished("r", "e", out, False, 1.0, [], {})
        store.stage_failed("r", "e", f"JudgeError: {res['judge_error']}")
    written = [
        (tmp_path / "r.json").read_text(),
        caplog.text,
        capsys.readouterr().err,
        (tmp_path / "s.sqlite").read_bytes().decode("latin-1"),
    ]
    for wal in tmp_path.glob("s.sqlite*"):
        written.append(wal.read_bytes().decode("latin-1"))
    for text in written:
        assert secret not in text
    assert "[REDACTED]" in (tmp_path / "r.json").read_text()


def test_sigterm_is_handled_like_ctrl_c(monkeypatch, capsys):
    import os
    import signal
    import time

    import recoup.commands.runs

    def killed(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(recoup.commands.runs, "run", killed)
    assert main(["runs"]) == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0]
    assert signal.getsignal(signal.SIGTERM) is not killed  # the previous handler is restored


def test_interrupt_marks_the_running_stage_interrupted(tmp_path):
    from recoup.recipe import load_recipe
    from recoup.runs.executor import LocalExecutor
    from recoup.runs.run import run_recipe
    from recoup.runs.store import Store

    class Interrupted(LocalExecutor):
        def next_done(self):
            raise KeyboardInterrupt

    save_tiny(tmp_path / "m")
    (tmp_path / "r.yaml").write_text(VALID_RECIPE.replace("smollm2-135m", str(tmp_path / "m")))
    with Store(tmp_path / "s.sqlite") as store:
        with pytest.raises(KeyboardInterrupt):
            run_recipe(load_recipe(str(tmp_path / "r.yaml")), tmp_path / "run", store, Interrupted(), report=False)
        run = store.runs()[0]
        assert run["status"] == "interrupted"
        assert [s["status"] for s in store.stages(run["run_id"])] == ["interrupted"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) <= [".recoup.lock", "run.json", "stages"]


def test_hub_ids_fail_fast_offline(monkeypatch):
    import socket

    import huggingface_hub.constants

    from recoup.errors import RecoupError
    from recoup.model.load import load_pretrained

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RecoupError, match="HF_HUB_OFFLINE"):
        load_pretrained("recoup-test-org/no-such-model")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(RecoupError, match="huggingface.co is unreachable"):
        load_pretrained("recoup-test-org/no-such-model")

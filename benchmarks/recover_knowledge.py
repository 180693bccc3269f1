"""The knowledge-recovery study: what each recovery without task data wins back on compressed models.

Row grammar (``--rows``, comma-separated; the same rows are measured on every artifact):

    dense | compressed            the artifact's dense source / the artifact alone
    eora:R                        EoRA, rank R (training-free; --calib, --nsamples x --calib-seqlen)
    eora:R@E                      EoRA, per-layer rank: the smallest keeping share E of each layer's error energy, <= R
    soft-prompt:OBJ | idp:OBJ     a soft prompt / IDP pool trained on --data (generic text, default ptb,wiki)
    lora:OBJ                      LoRA rank --lora-rank from PEFT's init, trained on --data
    lora:OBJ+eora                 the same LoRA started from EoRA rank --lora-rank (`--inherit`; row eora:<rank>'s
                                  directory is reused, or fitted; the fit seconds include EoRA's)
    lora:task=T | cpet:task=T     references trained on task T's train part (held-out split as the SciQ column;
                                  CPET with its recovery modules); LoRA rank --lora-rank
    tune:PARTS:OBJ                `recoup recover ART --method tune`: the artifact's own PARTS (a +-joined list of
                                  scales, norms, weights) trained on --data into a new artifact of the same format
                                  and size in --workdir, measured as the model (0 extra parameters); a row whose
                                  parts do not apply to an artifact (scales on an unquantized one, weights on a
                                  quantized one) is skipped there with the reason printed
    tune:PARTS:OBJ:bw=N           the same, each decoder layer first fitted N steps to the dense layer's output
                                  on the compression's calibration windows (tune's --blockwise-steps N)

OBJ is an objective: lm (next-token loss), kd (distil the dense source) or lm+kd; a tune row also takes
squarehead (match the dense source's decoder-layer outputs) and its sums (kd+squarehead, ...). ``--steps``
overrides every trained row's steps (default: each method's own).

Columns: PTB and wiki test perplexity (``--ppl-windows`` x ``--ppl-seqlen``); accuracy (acc, lm-eval definitions,
through the evaluation Scorer, per example kept) on ARC-Easy (``--arc`` seeded examples, 0 = all 570), PIQA
(``--piqa``), the SciQ held-out part (seeded hash split, fraction 0.3: the part the task rows never see; ``--sciq``
first), MMLU (``--mmlu`` seeded examples, ``--mmlu-shots``; the registered task's seeded sample); extra parameters
(and % of the base); fit seconds; prefill and per-token decode latency (batch 1, the first ``--prompt-len`` PTB-test
tokens, ``--new-tokens`` greedy steps, median of ``--repeats`` after a warm-up, on torch's threads: recorded).
Every accuracy delta is against the compressed row with a paired bootstrap 95% interval; gap closed is the share
of the compressed -> dense gap; a value within 5% of dense matches (``recoup.evaluate.metrics.matching``).

``--artifacts`` names one or more artifacts (``LABEL=PATH`` or a path, labelled by its folder name); the tables
group by artifact. Each row is written to ``<out>/rows/<label>--<row>.json`` as soon as it is measured (the dense
row once per dense source, ``dense--<source>.json``); a rerun skips finished rows (a column a finished row lacks,
such as a newly asked ``--tasks`` entry, is scored on the row's saved recovery in ``--workdir``) and measures a
recovery whose fit finished in ``--workdir`` before the study stopped (its run record says so) without refitting;
``--report-only`` just rebuilds ``<out>/recover_knowledge.{json,md,png}`` (an artifact since deleted keeps its
group: its dense source and skipped rows come from the last report). ``--fitted-from DIR`` measures the
recoveries a study with ``--out DIR`` fitted into the same ``--workdir`` at this run's evaluation settings (a larger
protocol) without refitting. The full study (``A=/work/wt/eora-art``; 8x exists already):

    recoup compress smollm2-135m --method sparsegpt --sparsity 0.5 --bits 4 --group-size 64 --calib ptb \\
        --nsamples 32 --seqlen 512 --out $A/8x
    recoup compress smollm2-135m --method gptq --bits 3 --group-size 64 --calib ptb --nsamples 32 --seqlen 512 \\
        --out $A/gptq-w3g64
    recoup compress smollm2-135m --method sparsegpt --pattern 2:4 --calib ptb --nsamples 32 --seqlen 512 \\
        --out $A/sparsegpt-2of4
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/recover_knowledge.py \\
        --artifacts 8x=$A/8x,gptq-w3g64=$A/gptq-w3g64,sparsegpt-2of4=$A/sparsegpt-2of4 \\
        --rows dense,compressed,soft-prompt:lm,soft-prompt:kd,idp:kd,eora:8,eora:32,eora:128,eora:128@0.5,\\
lora:kd,lora:kd+eora,lora:task=sciq,cpet:task=sciq \\
        --lora-rank 32 --ppl-windows 8 --arc 0 --piqa 500 --sciq 0 --mmlu 500 \\
        --out benchmarks/results/recover_knowledge --workdir $A/recoveries

Smoke (bundled model, minutes): ``recoup compress smollm2-135m --method sparsegpt --sparsity 0.5 --bits 4
--group-size 64 --nsamples 4 --seqlen 128 --out /tmp/study-art``, then ``--artifacts /tmp/study-art --rows
dense,compressed,eora:8 --examples 20 --ppl-windows 1 --ppl-seqlen 256 --steps 2 --nsamples 4 --calib-seqlen 128
--out /tmp/study-smoke --workdir /tmp/study-work``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import platform
import re
import time
from pathlib import Path

import torch
from recover_knowledge_report import TASKS, analyse, markdown, plot

from recoup.model.recovery import RUN_RECORD

log = logging.getLogger("recover_knowledge")
OBJECTIVES = ("lm", "kd", "lm+kd")
ROW = re.compile(
    r"^(?:(dense|compressed)|eora:(\d+)(?:@([0-9.]+))?|(soft-prompt|idp):([a-z+]+)|"
    r"lora:([a-z+]+?)(\+eora)?|(lora|cpet):task=([a-z_]+)|tune:([a-z+]+):([a-z+]+)(?::bw=(\d+))?)$"
)
TUNE_PARTS = ("scales", "norms", "weights")  # recoup.recover.tune.TRAINABLE


@dataclasses.dataclass
class Row:
    spec: str
    method: str  # dense | compressed | eora | soft-prompt | idp | lora | cpet | tune
    rank: int | None = None
    energy: float | None = None
    objective: str | None = None
    from_eora: bool = False
    task: str | None = None
    parts: tuple[str, ...] = ()  # tune: what trains inside the artifact
    blockwise: int = 0  # tune: block-wise reconstruction steps per decoder layer (0: off)


def parse_row(spec: str) -> Row:
    """A row spec of the module docstring's grammar; SystemExit with the grammar otherwise."""
    from recoup.recover.losses import OBJECTIVES as TUNE_OBJECTIVES

    m = ROW.match(spec)
    obj = m and (m.group(5) or m.group(6))
    parts = m and m.group(10) and m.group(10).split("+")
    if (
        not m
        or (obj and obj not in OBJECTIVES)
        or (parts and (any(p not in TUNE_PARTS for p in parts) or len(set(parts)) < len(parts)))
        or (parts and m.group(11) not in TUNE_OBJECTIVES)
        or (m.group(12) is not None and int(m.group(12)) < 1)
    ):
        raise SystemExit(
            f"bad row '{spec}': use dense, compressed, eora:R[@E], soft-prompt:OBJ, idp:OBJ, lora:OBJ, "
            f"lora:OBJ+eora, lora:task=T, cpet:task=T (OBJ: {', '.join(OBJECTIVES)}), tune:PARTS:OBJ (PARTS: "
            f"+-joined {', '.join(TUNE_PARTS)}; OBJ: {', '.join(TUNE_OBJECTIVES)}), tune:PARTS:OBJ:bw=N (N >= 1)"
        )
    if parts:
        return Row(
            spec,
            "tune",
            objective=m.group(11),
            parts=tuple(p for p in TUNE_PARTS if p in parts),
            blockwise=int(m.group(12) or 0),
        )
    if m.group(1):
        return Row(spec, m.group(1))
    if m.group(2):
        energy = float(m.group(3)) if m.group(3) else None
        if energy is not None and not 0 < energy <= 1:
            raise SystemExit(f"bad row '{spec}': the energy share must be in (0, 1]")
        return Row(spec, "eora", rank=int(m.group(2)), energy=energy)
    if m.group(4):
        return Row(spec, m.group(4), objective=obj)
    if m.group(6):
        return Row(spec, "lora", objective=obj, from_eora=bool(m.group(7)))
    return Row(spec, m.group(8), task=m.group(9))


def safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=@-]+", "-", name).strip("-")


def recover_flat(row: Row, args, inherit: str | None = None) -> dict:
    """The ``recoup recover`` keys of a fitted row."""
    if row.method == "eora":
        flat = {
            "method": "eora",
            "rank": row.rank,
            "calib": args.calib,
            "nsamples": args.nsamples,
            "seqlen": args.calib_seqlen,
            "seed": args.seed,
        }
        return {**flat, "energy": row.energy} if row.energy is not None else flat
    flat = {"method": row.method, "seed": args.seed}
    if row.method == "tune":
        flat["trainable"] = ",".join(row.parts)
        if row.blockwise:
            flat["blockwise_steps"] = row.blockwise
    if row.task:
        flat.update({"task": row.task, "heldout_fraction": 0.3})
    else:
        flat.update({"data": args.data, "objective": row.objective})
    if row.method in ("lora", "cpet"):
        flat["rank"] = args.lora_rank
    if row.method == "cpet":
        flat["recovery_modules"] = True
    if inherit:
        flat["inherit"] = inherit
    if args.steps:
        flat["steps"] = args.steps
    return flat


def fit_row(row: Row, artifact: str, args, workdir: Path) -> tuple[str | None, dict]:
    """Fit ``row`` on ``artifact``; (its recovery directory or None, {parameters, fit_seconds, config})."""
    from recoup.recipe.jobs import RecoverJob
    from recoup.recover.methods import load_recovery
    from recoup.runs.stages import recover

    if row.method in ("dense", "compressed"):
        return None, {"parameters": 0, "fit_seconds": 0.0, "config": None}
    extra_seconds, inherit = 0.0, None
    if row.from_eora:
        inherit = workdir / f"eora-{args.lora_rank}"
        if not (inherit / "adapter_config.json").is_file():
            fit_row(Row(f"eora:{args.lora_rank}", "eora", rank=args.lora_rank), artifact, args, workdir)
        extra_seconds = float(load_recovery(inherit).meta["seconds"])
    out = workdir / safe(row.spec.replace(":", "-"))
    flat = recover_flat(row, args, str(inherit) if inherit else None)
    job = RecoverJob.from_flat({**flat, "model": artifact, "out": str(out), "force": True})
    done = finished_fit(out, job)
    if done is not None:  # an interrupted study's fit: measure it, do not refit (its own fit seconds)
        log.info("%s: fitted before (%s), measuring it", out, RUN_RECORD)
        fitted = {
            "parameters": done["parameters"],
            "fit_seconds": round(done["total_seconds"] + extra_seconds, 1),
            "config": done["config"],
            "fit_resumed": True,
        }
    else:
        started = time.time()
        summary = recover(job)
        fitted = {
            "parameters": summary["parameters"],
            "fit_seconds": round(time.time() - started + extra_seconds, 1),
            "config": summary["config"],
        }
    if row.method == "tune":  # what the new artifact's manifest records of its tuning (validation losses included)
        from recoup.artifact.store import read_manifest

        fitted["tuning"] = read_manifest(out)["tuning"][-1]
    return str(out), fitted


def finished_fit(out: Path, job) -> dict | None:
    """The run record of a recovery already fitted into ``out`` for the same artifact and settings as ``job`` (a
    study stopped during its evaluation), or None. `recoup recover` writes the record last, after the recovery
    itself, so a record means the fit finished; its ``total_seconds`` (the fit, without loading the model) is the
    row's fit time."""
    record = out / RUN_RECORD
    if not record.is_file():
        return None
    done = json.loads(record.read_text())
    same = done.get("model") == job.model and done.get("method") == job.method
    return done if same and done.get("config") == json.loads(json.dumps(job.config.to_dict())) else None


def tune_skip(row: Row, manifest: dict, label: str) -> str | None:
    """Why the tune row ``row`` does not apply to the artifact of ``manifest`` (tune's own refusal: scales on an
    unquantized artifact, weights on a quantized one, block-wise steps without a calibration record), or None."""
    from recoup.errors import RecoupError
    from recoup.recover.tune import calibration_of, refuse_parts

    if row.method != "tune":
        return None
    try:
        refuse_parts(manifest, row.parts, label)
        if row.blockwise:
            calibration_of(manifest, label)
    except RecoupError as e:
        return str(e)
    return None


def measured_model(row: Row, artifact: str, dense: str, recovery: str | None) -> tuple[str, str | None]:
    """(the model a row is measured as, the recovery attached to it): a tune row's recovery is a new artifact,
    measured like any model with nothing attached."""
    if row.method == "tune":
        return str(recovery), None
    return (dense if row.method == "dense" else artifact), recovery


def fitted_before(row: Row, label: str, name: str, args) -> tuple[str | None, dict | None]:
    """(the recovery, its fit record) of a row another study (``--fitted-from``) fitted into this ``--workdir``,
    to measure it at other evaluation settings without refitting; (None, None) for an untrained row or one that
    study lacks. Its recovery must still be there: the row is refitted only when asked (remove it there)."""
    if row.method in ("dense", "compressed"):
        return None, None
    old = Path(args.fitted_from) / "rows" / name
    if not old.is_file():
        log.info("%s %s: not in %s, fitting it", label, row.spec, args.fitted_from)
        return None, None
    recovery = Path(args.workdir) / safe(label) / safe(row.spec.replace(":", "-"))
    if not recovery.is_dir():
        raise SystemExit(f"{old} was fitted but its recovery {recovery} is gone; drop --fitted-from to refit it")
    before = json.loads(old.read_text())
    return str(recovery), {
        "parameters": before["parameters"],
        "fit_seconds": before["fit_seconds"],
        "config": before["config"],
        **({"tuning": before["tuning"]} if "tuning" in before else {}),
        "fitted_in": str(args.fitted_from),
    }


def task_examples(args) -> tuple[dict[str, list[dict]], dict]:
    """The scored examples of every accuracy column (the same for every row) and how they were drawn."""
    from recoup.evaluate.tasks import load_examples
    from recoup.evaluate.tasks.common import sample_indices
    from recoup.recover.task_data import split_task

    out: dict[str, list[dict]] = {}
    proto: dict[str, str] = {}
    for task, limit, opts in (
        ("arc_easy", args.arc, {}),
        ("piqa", args.piqa, {}),
        ("mmlu", args.mmlu, {"shots": args.mmlu_shots}),
    ):
        if task not in args.tasks:
            continue
        every = load_examples(task, opts)
        out[task] = [every[i] for i in sample_indices(len(every), limit or None, args.seed)]
        proto[task] = (
            f"{len(out[task])} of {len(every)} (seed {args.seed}{', %d-shot' % args.mmlu_shots if opts else ''})"
        )
    split = split_task("sciq", 0.3, args.seed)
    held = split.heldout[: args.sciq] if args.sciq else split.heldout
    out["sciq"] = [ex.as_suite() for ex in held]
    proto["sciq"] = (
        f"first {len(held)} of the {len(split.heldout)}-example held-out part (fraction 0.3, seed {args.seed})"
    )
    return out, {**proto, "sciq_split": split}


def score_examples(model, tokenizer, examples: list[dict], recovery, batch_size: int) -> dict[str, list[float]]:
    """Per-example acc and acc_norm through the Scorer (compare-recovery's scoring); ``model`` has the recovery
    attached."""
    from recoup.evaluate.heldout import per_example_scores

    return per_example_scores(model, tokenizer, examples, recovery, batch_size)


def evaluate_row(row: Row, source: str, recovery: str | None, args, examples: dict) -> dict:
    """Every column of one row (``source`` with ``recovery`` attached)."""
    from recoup.data.windows import corpus_ids
    from recoup.evaluate.latency import LatencyConfig, measure_latency
    from recoup.recipe.jobs import EvalJob
    from recoup.runs.stages import evaluate

    started = time.time()
    tasks = ["ppl:ptb", "ppl:wiki"]
    res = evaluate(
        EvalJob.from_flat(
            {
                "model": source,
                "tasks": tasks,
                "limits": {t: args.ppl_windows for t in tasks},
                "seqlen": args.ppl_seqlen,
                "seed": args.seed,
                "recovery": recovery,
            }
        )
    )["results"]
    loaded, rec, net = attached(row, source, recovery, examples)
    base = sum(p.numel() for n, p in loaded.model.named_parameters() if "lora_" not in n)  # without an attached LoRA
    out = {
        "model_manifest_sha256": (loaded.manifest or {}).get("manifest_sha256"),  # an artifact's identity
        "ppl_ptb": res["ppl:ptb"]["ppl"],
        "ppl_wiki": res["ppl:wiki"]["ppl"],
        "ppl_windows": args.ppl_windows,
        "base_parameters": base,
        "per_example": {},
        "examples_digest": {},
    }
    score_tasks(out, net, loaded.tokenizer, rec, [t for t, _ in TASKS], args, examples)
    prompt = corpus_ids(loaded.tokenizer, "ptb", "test")[: args.prompt_len][None]  # the same tokens for every row
    lat = measure_latency(net, prompt, rec, LatencyConfig(args.prompt_len, args.new_tokens, args.repeats))
    lat.pop("generated")
    out.update(
        {
            "prefill_ms": lat["prefill_ms"],
            "decode_ms_per_token": lat["decode_ms_per_token"],
            "latency": lat,
            "eval_seconds": round(time.time() - started, 1),
        }
    )
    return out


def attached(row: Row, source: str, recovery: str | None, examples: dict):
    """(loaded model, recovery or None, the model with it attached) for one row; a SciQ-tuned recovery is
    checked never to have seen the held-out examples scored."""
    from recoup.artifact import load_model
    from recoup.recover.methods import load_recovery
    from recoup.runs.compare_recovery import check_tuning_split

    loaded = load_model(source)
    rec = load_recovery(recovery) if recovery else None
    if rec is not None:
        check_tuning_split(row.spec, rec.describe(), examples["split"])
    return loaded, rec, (rec.apply(loaded.model) if rec is not None else loaded.model)


def score_tasks(out: dict, net, tokenizer, rec, tasks: list[str], args, examples: dict) -> None:
    """Score ``tasks`` into the row ``out``: acc (and acc_norm), example count, per-example acc, digest."""
    with torch.no_grad():
        for task in tasks:
            per = score_examples(net, tokenizer, examples[task], rec, args.batch_size)
            out[task] = sum(per["acc"]) / len(per["acc"])
            if task != "mmlu":  # MMLU scores answer letters: length normalisation is meaningless (as the task)
                out[f"{task}_acc_norm"] = sum(per["acc_norm"]) / len(per["acc_norm"])
            out[f"{task}_n"] = len(per["acc"])
            out["per_example"][task] = per["acc"]
            out["examples_digest"][task] = digest(examples[task])


def add_columns(
    row: Row, measured: dict, source: str, recovery: str | None, tasks: list[str], args, examples: dict
) -> dict:
    """A cached row with the accuracy columns ``tasks`` it lacks scored now, on the row's saved recovery
    (the same model, recovery and Scorer as its other columns); the seconds go in ``columns_added``."""
    started = time.time()
    loaded, rec, net = attached(row, source, recovery, examples)
    score_tasks(measured, net, loaded.tokenizer, rec, tasks, args, examples)
    measured.setdefault("columns_added", {}).update({t: round(time.time() - started, 1) for t in tasks})
    return measured


def digest(examples: list[dict]) -> str:
    """Which examples were scored, in order (sha256 of their ids): paired rows must share it."""
    return hashlib.sha256("\n".join(str(ex["id"]) for ex in examples).encode()).hexdigest()[:16]


def parse_artifacts(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in [s.strip() for s in text.split(",") if s.strip()]:
        label, sep, path = item.partition("=")
        label, path = (label, path) if sep else (Path(item).name, item)
        if label in out:
            raise SystemExit(f"two artifacts labelled '{label}': name them LABEL=PATH")
        out[label] = path
    return out


def arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifacts", required=True, help="comma-separated artifacts, each PATH or LABEL=PATH")
    ap.add_argument("--rows", default="dense,compressed,eora:8,eora:32")
    ap.add_argument("--data", default="ptb,wiki", help="generic training text of the trained rows")
    ap.add_argument("--steps", type=int, default=None, help="steps of every trained row (default: each method's)")
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--calib", default="ptb", help="EoRA calibration corpus")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--ppl-seqlen", type=int, default=2048)
    ap.add_argument("--arc", type=int, default=0, help="seeded ARC-Easy examples (0: all 570)")
    ap.add_argument("--piqa", type=int, default=500, help="seeded PIQA examples (0: all 1838)")
    ap.add_argument("--sciq", type=int, default=0, help="first SciQ held-out examples (0: all)")
    ap.add_argument("--mmlu", type=int, default=500, help="seeded MMLU test examples (0: all)")
    ap.add_argument("--mmlu-shots", type=int, default=5)
    ap.add_argument("--examples", type=int, default=None, help="set --arc, --piqa, --sciq and --mmlu at once")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--fitted-from",
        default=None,
        metavar="DIR",
        help="another study's --out whose rows were fitted into this --workdir: measure those recoveries "
        "at this run's evaluation settings instead of refitting them (fit seconds are theirs)",
    )
    ap.add_argument("--report-only", action="store_true", help="table and plot from the rows already measured")
    ap.add_argument("--out", default="benchmarks/results/recover_knowledge")
    ap.add_argument("--workdir", default="/tmp/recover_knowledge", help="where the fitted recoveries go (large)")
    ap.add_argument(
        "--tasks",
        default=",".join(t for t, _ in TASKS),
        help="accuracy columns to measure (default all: arc_easy,piqa,sciq,mmlu)",
    )
    args = ap.parse_args()
    args.tasks = [t for t in args.tasks.split(",") if t]
    known = [t for t, _ in TASKS]
    if not args.tasks or any(t not in known for t in args.tasks):
        ap.error(f"--tasks: choose from {','.join(known)} (got {','.join(args.tasks) or 'none'})")
    TASKS[:] = [t for t in TASKS if t[0] in args.tasks]  # the columns every row and the report use
    if args.examples is not None:
        args.arc = args.piqa = args.sciq = args.mmlu = args.examples
    return args


def main() -> None:
    args = arguments()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    from recoup.artifact.store import read_manifest

    rows = [parse_row(r.strip()) for r in args.rows.split(",") if r.strip()]
    artifacts = parse_artifacts(args.artifacts)
    out = Path(args.out)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    examples, drawn = None, {}
    if not args.report_only:  # drawn once, the same for every row; the row files record which (examples_digest)
        examples, drawn = task_examples(args)
        examples["split"] = drawn.pop("sciq_split")
        (out / "examples.json").write_text(json.dumps(drawn, indent=1))
    elif (out / "examples.json").is_file():
        drawn = json.loads((out / "examples.json").read_text())
    groups: dict[str, dict] = {}
    before = {}  # the last report's groups: where a --report-only run takes a deleted artifact's dense source from
    if (out / "recover_knowledge.json").is_file():
        before = json.loads((out / "recover_knowledge.json").read_text()).get("artifacts", {})
    for label, artifact in artifacts.items():
        manifest, dense = None, None
        if args.report_only and not Path(artifact).is_dir():  # the study's artifacts are large and may be gone
            dense = (before.get(label) or {}).get("dense")
            if dense is None:
                raise SystemExit(f"{artifact} is gone and {out / 'recover_knowledge.json'} has no '{label}' group")
        else:
            manifest = read_manifest(artifact)
            src = manifest["source"]
            dense = src.get("path") or src["model"]
        measured: dict[str, dict] = {}
        skipped: dict[str, str] = {}  # tune rows that do not apply to this artifact, with tune's reason
        for row in rows:
            done = (
                out
                / "rows"
                / (
                    f"dense--{safe(dense)}.json"
                    if row.method == "dense"
                    else f"{safe(label)}--{safe(row.spec.replace(':', '-'))}.json"
                )
            )
            if done.is_file():
                cached = measured[row.spec] = json.loads(done.read_text())
                log.info("%s %s: cached %s", label, row.spec, done)
                if examples is None:
                    continue
                if any(
                    cached["examples_digest"][t] != digest(examples[t])
                    for t, _ in TASKS
                    if t in cached["examples_digest"]
                ):
                    raise SystemExit(
                        f"{done} scored other examples than these settings draw; remove it or rerun with its settings"
                    )
                missing = [t for t, _ in TASKS if t not in cached["examples_digest"]]
                if missing:  # a new column: score it on the row's saved recovery, keep the rest
                    recovery = None
                    if row.method not in ("dense", "compressed"):
                        recovery = str(Path(args.workdir) / safe(label) / safe(row.spec.replace(":", "-")))
                        if not Path(recovery).is_dir():
                            raise SystemExit(
                                f"{done} lacks {', '.join(missing)} and its recovery {recovery} is "
                                f"gone; remove the row file to refit it"
                            )
                    log.info("%s %s: adding %s", label, row.spec, ", ".join(missing))
                    add_columns(row, cached, *measured_model(row, artifact, dense, recovery), missing, args, examples)
                    done.write_text(json.dumps(cached, indent=1))
                continue
            reason = (
                tune_skip(row, manifest, label)
                if manifest
                else (before.get(label) or {}).get("skipped", {}).get(row.spec)
            )
            if reason:
                skipped[row.spec] = reason
                print(f"{label} {row.spec}: skipped: {reason}", flush=True)
                continue
            if args.report_only:
                log.info("%s %s: not measured", label, row.spec)
                continue
            recovery, fitted = fitted_before(row, label, done.name, args) if args.fitted_from else (None, None)
            if fitted is None:
                recovery, fitted = fit_row(row, artifact, args, Path(args.workdir) / safe(label))
            source, recovery = measured_model(row, artifact, dense, recovery)
            measured[row.spec] = {**fitted, **evaluate_row(row, source, recovery, args, examples)}
            r = measured[row.spec]
            r["parameters_pct"] = 100.0 * r["parameters"] / r["base_parameters"]
            done.write_text(json.dumps(r, indent=1))
            log.info("%s %s: %s", label, row.spec, json.dumps({k: v for k, v in r.items() if k != "per_example"}))
        base = measured.get("compressed", {}).get("base_parameters")
        for r in measured.values():  # against the model with nothing attached (rows measured before the count
            if base:  # above left out LoRA tensors counted an attached adapter in their base)
                r["parameters_pct"] = 100.0 * r["parameters"] / base
        groups[label] = {
            "artifact": artifact,
            "dense": dense,
            "rows": measured,
            "skipped": skipped,
            "analysis": analyse(measured, args.bootstrap, args.seed),
        }
    # the threads the rows' latencies were measured with (a --report-only run's own count says nothing of them)
    threads = sorted(
        {
            r["latency"]["threads"]
            for g in groups.values()
            for r in g["rows"].values()
            if isinstance(r.get("latency"), dict) and "threads" in r["latency"]
        }
    ) or [torch.get_num_threads()]
    protocol = (
        f"Perplexity: PTB / wiki test, {args.ppl_windows} x {args.ppl_seqlen}. Accuracy (acc, "
        f"seed {args.seed}) on {', '.join(lab for _, lab in TASKS)}; "
        + "; ".join(f"{k}: {v}" for k, v in drawn.items())
        + f". Latency: batch 1, {args.prompt_len}-token PTB prompt, {args.new_tokens} decode "
        f"steps, median of {args.repeats}, {' or '.join(map(str, threads))} torch thread(s)."
    )
    setup = {
        "artifacts": artifacts,
        "rows": [r.spec for r in rows],
        "data": args.data,
        "steps": args.steps,
        "lora_rank": args.lora_rank,
        "eora_calibration": f"{args.calib} {args.nsamples} x {args.calib_seqlen}",
        "examples": drawn,
        "bootstrap": args.bootstrap,
        "seed": args.seed,
        "protocol": protocol,
        "threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "host": platform.node(),
        "torch": torch.__version__,
        "load_avg_at_start": load_start,
        "load_avg_at_end": os.getloadavg(),
    }
    (out / "recover_knowledge.json").write_text(json.dumps({"setup": setup, "artifacts": groups}, indent=1))
    table = markdown(groups, setup)
    (out / "recover_knowledge.md").write_text(table)
    if plot(groups, out / "recover_knowledge.png"):
        log.info("plot: %s", out / "recover_knowledge.png")
    print(table)


if __name__ == "__main__":
    main()

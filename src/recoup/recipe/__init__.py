"""Run recipes: YAML -> validated, typed :class:`Recipe`; ``--set key=value`` overrides.

A recipe names a model, compression steps, recovery steps, what to evaluate and a seed (see
``recoup/recipes/default.yaml``, shipped with the package). Each step is the typed job of its stage
(:mod:`recoup.recipe.jobs`) built from the step's keys, which are the CLI flags of ``recoup compress`` /
``recoup recover`` / ``recoup eval`` without the dashes; recipe-level ``dtype``, ``device``, ``seed`` and
the ``calibration`` section (``corpus`` -> ``calib``, ``nsamples``, ``seqlen``) are their defaults (for a
recovery step, of a method that calibrates: EoRA; a soft prompt's ``seqlen`` is its own training window). What
the run itself decides is not a key: the model a step reads (``model``, ``base``), where it writes
(``out``, ``force``), a recovery to attach (``recovery``: a recover step), results files (``json``: the
store). Validation collects every mistake and reports each on one line (``where: what is wrong; what is
allowed``): unknown keys with a did-you-mean, wrong types, values out of range, unknown methods and
missing files, all before any model is loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Union, get_type_hints

import yaml

from recoup.errors import RecoupError
from recoup.overrides import apply_override, parse_override
from recoup.recipe.jobs import CompressJob, EvalJob, RecoverJob
from recoup.recipe.typecheck import type_name, type_ok, unknown_key

SHIPPED = ("default", "sweep")


def shipped_recipe_path(name: str) -> Path:
    """Path of a recipe shipped inside the package (``default``, ``sweep``)."""
    return Path(str(resources.files("recoup") / "recipes" / f"{name}.yaml"))


# ----------------------------------------------------------------------------- typed sections


@dataclasses.dataclass
class Calibration:
    corpus: str = "ptb"  # ptb | wiki | a .txt/.jsonl file
    nsamples: int = 128
    seqlen: int = 512

    def problems(self) -> list[str]:
        out = []
        if not 1 <= self.nsamples <= 4096:
            out.append(f"nsamples must be in [1, 4096] (got {self.nsamples})")
        if not 8 <= self.seqlen <= 32768:
            out.append(f"seqlen must be in [8, 32768] (got {self.seqlen})")
        out += corpus_problems(self.corpus, "corpus")
        return out


# The recipe's evaluate section: the keys of recoup eval (EvalJob) that a run does not decide, plus dense.
RUN_DECIDES_EVAL = ("model", "recovery", "json")
Evaluation = dataclasses.make_dataclass(
    "Evaluation",
    [
        (f.name, get_type_hints(EvalJob)[f.name], f)
        for f in dataclasses.fields(EvalJob)
        if f.name not in RUN_DECIDES_EVAL
    ]
    + [("dense", bool, dataclasses.field(default=True))],  # also evaluate the uncompressed model (the reference)
    namespace={"__doc__": "The evaluate section: recoup eval's keys (tasks, limit, limits, seqlen, ...) + dense."},
)


@dataclasses.dataclass
class Sweep:
    methods: list[str] = dataclasses.field(default_factory=lambda: ["magnitude", "wanda", "sparsegpt"])
    sparsity: list[float] = dataclasses.field(default_factory=lambda: [0.3, 0.5, 0.7])
    bits: list[Union[int, None]] = dataclasses.field(default_factory=lambda: [None])
    options: dict = dataclasses.field(default_factory=dict)  # extra compression keys for every cell

    def problems(self) -> list[str]:
        out = []
        if not self.methods or not self.sparsity or not self.bits:
            out.append("methods, sparsity and bits must each list at least one value")
        out += [f"sparsity must be in [0, 0.99] (got {s})" for s in self.sparsity if not 0 <= s <= 0.99]
        out += [f"bits must be one of 2, 3, 4, 8 or null (got {b})" for b in self.bits if b not in (None, 2, 3, 4, 8)]
        return out

    def cells(self) -> list[dict]:
        """One compression step per grid cell: methods x sparsity x bits."""
        cells = []
        for method in self.methods:
            for s in self.sparsity:
                for b in self.bits:
                    step = {"name": cell_name(method, s, b), "method": method, **self.options}
                    if s > 0 or b is None:
                        step["sparsity"] = s
                    if b is not None:
                        step["bits"] = b
                    cells.append(step)
        return cells


def cell_name(method: str, sparsity: float, bits: int | None) -> str:
    name = f"{method}-s{round(sparsity * 100):02d}"
    return name + (f"-w{bits}" if bits is not None else "")


@dataclasses.dataclass
class Report:
    matching: float = 0.05  # LLM-KICK: "matching" = within 5% of dense
    plots: bool = True

    def problems(self) -> list[str]:
        return [] if 0 < self.matching < 1 else [f"matching must be in (0, 1) (got {self.matching})"]


@dataclasses.dataclass
class Recipe:
    """A validated run recipe (see module doc). ``compress``/``recover`` hold the validated step dicts."""

    name: str = "run"
    description: str = ""
    model: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    calibration: Calibration = dataclasses.field(default_factory=Calibration)
    evaluate: Evaluation = dataclasses.field(default_factory=Evaluation)
    compress: list = dataclasses.field(default_factory=list)
    recover: list = dataclasses.field(default_factory=list)
    export: list = dataclasses.field(default_factory=list)  # {name, base, format, dtype, gguf_type, recovery, merge}
    sweep: Union[Sweep, None] = None
    report: Report = dataclasses.field(default_factory=Report)
    source: str = "<dict>"  # where it came from (not part of its identity)
    evaluation: Union[dict, None] = None  # the evaluate section as validated EvalJob keys (set by validate)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        d.pop("evaluation")
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def compress_steps(self) -> list[dict]:
        """Explicit compression steps followed by the sweep's cells (validated flat CompressJob keys + name)."""
        return list(self.compress)


_SECTIONS = {"calibration": Calibration, "evaluate": Evaluation, "sweep": Sweep, "report": Report}


# ----------------------------------------------------------------------------- checks


def corpus_problems(corpus: str, what: str) -> list[str]:
    from recoup.evaluate.tasks.perplexity import check_corpus

    try:
        check_corpus(corpus, what)
    except RecoupError as exc:
        return [str(exc)]
    return []


def _build(cls: type, data: Any, where: str, errors: list[str]) -> Any:
    """Instantiate a section dataclass from ``data``, appending one line per mistake to ``errors``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{where}: expected a mapping of keys, got {type(data).__name__}")
        return cls()
    hints = get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    kwargs = {}
    for key, value in data.items():
        if key not in allowed:
            errors.append(unknown_key(key, allowed, where))
            continue
        if key in _SECTIONS or key in ("compress", "recover", "export"):
            kwargs[key] = value  # sections are built by the caller
            continue
        if key == "tasks" and isinstance(value, str):
            value = [t.strip() for t in value.split(",") if t.strip()]
        if not type_ok(value, hints[key]):
            errors.append(f"{where}.{key}: expected {type_name(hints[key])}, got {type(value).__name__} {value!r}")
            continue
        if hints[key] is float and isinstance(value, int):
            value = float(value)
        kwargs[key] = value
    obj = cls(**{k: v for k, v in kwargs.items() if k not in _SECTIONS and k not in ("compress", "recover", "export")})
    if hasattr(obj, "problems"):
        errors += [f"{where}: {p}" if not p.startswith(("task ", "corpus")) else f"{where}.{p}" for p in obj.problems()]
    return obj


def _check_steps(
    steps: Any, kind: str, errors: list[str], required: tuple[str, ...] = ("name", "method")
) -> list[dict]:
    if steps is None:
        return []
    if not isinstance(steps, list):
        errors.append(f"{kind}: expected a list of steps, got {type(steps).__name__}")
        return []
    out, seen = [], set()
    for i, step in enumerate(steps):
        where = f"{kind}[{i}]"
        if not isinstance(step, dict):
            errors.append(f"{where}: expected a mapping with at least name and method, got {type(step).__name__}")
            continue
        step = {str(k): v for k, v in step.items()}  # YAML 1.1 reads a bare `on:` key as true
        for req in required:
            if not isinstance(step.get(req), str) or not step.get(req):
                errors.append(f"{where}: '{req}' is required (a string)")
        name = step.get("name")
        if isinstance(name, str) and name:
            where = f"{kind}[{i}] ({name})"
            if name in seen:
                errors.append(f"{where}: duplicate step name '{name}'")
            if name == "dense" or not all(c.isalnum() or c in "-_." for c in name):
                errors.append(f"{where}: step names use letters, digits, '-', '_' or '.' and may not be 'dense'")
            seen.add(name)
        out.append(step)
        step["_where"] = where
    return out


def _where(err: RecoupError, where: str) -> str:
    text = str(err)
    return text if text.startswith(where) else f"{where}: {text}"


def _calibration_keys(recipe: Recipe) -> dict:
    cal = recipe.calibration if not recipe.calibration.problems() else Calibration()  # its own lines say why
    return {"calib": cal.corpus, "nsamples": cal.nsamples, "seqlen": cal.seqlen}


def _compress_step(step: dict, recipe: Recipe, errors: list[str]) -> dict | None:
    """A compress step (or sweep cell) -> its validated flat CompressJob keys (+ name), or None."""
    where = step.pop("_where")
    for key in ("model", "out", "force", "calibration"):
        if key in step:
            errors.append(
                f"{where}: '{key}' is not a step key ("
                + (
                    "the calibration keys of a step are calib, nsamples, seqlen"
                    if key == "calibration"
                    else "the run decides it"
                )
                + ")"
            )
            return None
    flat = {
        "model": recipe.model,
        "dtype": recipe.dtype,
        "device": recipe.device,
        "seed": recipe.seed,
        **_calibration_keys(recipe),
        **{k: v for k, v in step.items() if k != "name"},
    }
    try:
        job = CompressJob.from_flat(flat, where=where)
    except RecoupError as exc:
        errors.append(_where(exc, where))
        return None
    keys = {k: v for k, v in job.to_flat().items() if k not in ("model", "out", "force")}
    return {"name": step["name"], **keys}


def _recover_step(step: dict, recipe: Recipe, names: list[str], errors: list[str]) -> dict | None:
    """A recover step -> ``{name, base, transfer}`` + its validated flat RecoverJob keys, or None."""
    where = step.pop("_where")
    base = step.get("base")
    if not isinstance(base, str) or base not in names:
        close = difflib.get_close_matches(str(base), names, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        what = (
            "is required: the compression step to learn on" if base is None else f"'{base}' is not a compression step"
        )
        errors.append(f"{where}.base: {what}{hint} (steps: {', '.join(names) or 'none'})")
    transfer = step.get("transfer") or []
    if isinstance(transfer, str):
        transfer = [transfer]
    if not isinstance(transfer, list):
        errors.append(f"{where}.transfer: expected a list of compression step names (or 'dense')")
        transfer = []
    for t in transfer:
        if t != "dense" and t not in names:
            close = difflib.get_close_matches(str(t), names + ["dense"], n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            errors.append(f"{where}.transfer: '{t}' is not a compression step{hint}")
    for key in ("model", "out", "force"):
        if key in step:
            errors.append(f"{where}: '{key}' is not a step key (the run decides it)")
            return None
    keys = {k: v for k, v in step.items() if k not in ("name", "base", "transfer")}
    if not isinstance(keys.get("method"), str):
        return None
    try:
        from recoup.recover.methods import RECOVERIES

        fields = RECOVERIES.get(keys["method"]).config.field_names()
        defaults = {
            "dtype": recipe.dtype,
            "device": recipe.device,
            **({"seed": recipe.seed} if "seed" in fields else {}),
        }
        if "calib" in fields:  # a method that calibrates (EoRA): the calibration section is its default
            defaults.update(_calibration_keys(recipe))
        job = RecoverJob.from_flat({"model": recipe.model, **defaults, **keys}, where=where)
    except RecoupError as exc:
        errors.append(_where(exc, where))
        return None
    flat = {k: v for k, v in job.to_flat().items() if k not in ("model", "out", "force")}
    return {"name": step["name"], "base": base, "transfer": transfer, **flat}


def _export_step(step: dict, names: list[str], recoveries: list[str], errors: list[str]) -> dict | None:
    """An export step -> ``{name, base, recovery}`` + its validated ExportConfig keys (format, dtype ...)."""
    from recoup.artifact.export import ExportConfig

    where = step.pop("_where")
    base, rec = step.get("base"), step.get("recovery")
    if base not in names:
        errors.append(f"{where}.base: '{base}' is not a compression step (steps: {', '.join(names) or 'none'})")
        return None
    if rec is not None and rec not in recoveries:
        errors.append(f"{where}.recovery: '{rec}' is not a recover step (steps: {', '.join(recoveries) or 'none'})")
        return None
    for key in ("source", "out"):
        if key in step:
            errors.append(f"{where}: '{key}' is not a step key (the run decides it)")
            return None
    keys = {k: v for k, v in step.items() if k not in ("name", "base", "recovery")}
    try:
        job = ExportConfig.from_dict(
            {**keys, "source": "<artifact>", "out": "<stage>", "recovery": "<recovery>" if rec else None}, where=where
        )
    except RecoupError as exc:
        errors.append(_where(exc, where))
        return None
    flat = {k: v for k, v in job.to_dict().items() if k not in ("source", "out", "recovery")}
    return {"name": step["name"], "base": base, "recovery": rec, **flat}


def _evaluation(recipe: Recipe, errors: list[str]) -> dict | None:
    """The evaluate section as validated flat EvalJob keys (without model/recovery/json)."""
    ev = {f.name: getattr(recipe.evaluate, f.name) for f in dataclasses.fields(recipe.evaluate) if f.name != "dense"}
    try:
        job = EvalJob.from_flat(
            {"model": recipe.model, "dtype": recipe.dtype, "device": recipe.device, "seed": recipe.seed, **ev},
            where="evaluate",
        )
    except RecoupError as exc:
        errors.append(_where(exc, "evaluate"))
        return None
    return {k: v for k, v in job.to_flat().items() if k not in RUN_DECIDES_EVAL}


def validate(raw: Any, source: str = "<dict>") -> Recipe:
    """Build a :class:`Recipe` from a parsed mapping; raise RecoupError listing every mistake, one per line."""
    errors: list[str] = []
    if not isinstance(raw, dict) or not raw:
        raise RecoupError(
            f"{source}: a recipe is a YAML mapping (name, model, compress, recover, evaluate ...)"
            + (" and this one is empty" if isinstance(raw, dict) or raw is None else "")
        )
    raw = copy.deepcopy(raw)
    recipe = _build(Recipe, raw, "recipe", errors)
    for key, cls in _SECTIONS.items():
        if key in raw and not (key == "sweep" and raw[key] is None):
            setattr(recipe, key, _build(cls, raw[key], key, errors))
    if recipe.dtype not in ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16"):
        errors.append(f"recipe.dtype: unknown dtype '{recipe.dtype}'; use float32, bfloat16 or float16")
    if recipe.device not in ("cpu", "cuda") and not recipe.device.startswith("cuda:"):
        errors.append(f"recipe.device: unknown device '{recipe.device}'; use cpu or cuda")
    if not isinstance(recipe.seed, int) or recipe.seed < 0:
        errors.append(f"recipe.seed must be >= 0 (got {recipe.seed})")
    model_errors = _model_problems(recipe.model)
    errors += model_errors
    checked_model = recipe.model
    if model_errors:  # said once above; the steps are checked against a stand-in so their own mistakes show
        from recoup.model.load import BUNDLED_ALIAS

        recipe.model = BUNDLED_ALIAS
    evaluation = _evaluation(recipe, errors)
    compress_raw = _check_steps(raw.get("compress"), "compress", errors)
    recover_raw = _check_steps(raw.get("recover"), "recover", errors)
    compress = [c for c in (_compress_step(s, recipe, errors) for s in compress_raw) if c]
    names = [s["name"] for s in compress_raw if isinstance(s.get("name"), str)]
    if recipe.sweep is not None:
        for cell in recipe.sweep.cells():
            cell["_where"] = f"sweep cell {cell['name']}"
            done = _compress_step(cell, recipe, errors)
            if done:
                compress.append(done)
            names.append(cell["name"])
    recover = [r for r in (_recover_step(s, recipe, names, errors) for s in recover_raw) if r]
    exports = [
        e
        for e in (
            _export_step(s, names, [r["name"] for r in recover_raw if isinstance(r.get("name"), str)], errors)
            for s in _check_steps(raw.get("export"), "export", errors, ("name", "format"))
        )
        if e
    ]
    if not errors and not compress and not recipe.evaluate.dense:
        errors.append("the recipe has no stage to run: add compress steps, a sweep, or evaluate.dense: true")
    recipe.model = checked_model
    if errors:
        unique = list(dict.fromkeys(errors))
        raise RecoupError(f"{source}: {len(unique)} problem(s) in the recipe:\n  " + "\n  ".join(unique))
    recipe.model = checked_model
    recipe.compress, recipe.recover, recipe.export, recipe.source = compress, recover, exports, source
    recipe.evaluation = evaluation
    return recipe


def _model_problems(model: str) -> list[str]:
    from recoup.model.load import BUNDLED_ALIAS

    if model == BUNDLED_ALIAS:
        return []
    path = Path(model).expanduser()
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or model.endswith(".gguf")
    if looks_local and not path.exists():
        return [f"recipe.model: no such file or directory: '{model}'"]
    return []


# ----------------------------------------------------------------------------- loading (overrides: recoup.overrides)


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file (None = the shipped default; ``default``/``sweep`` name shipped ones), apply overrides."""
    if path is None or str(path) in SHIPPED:
        file = shipped_recipe_path(str(path or "default"))
    else:
        file = Path(path).expanduser()
        if not file.is_file():
            raise RecoupError(f"recipe file not found: '{path}' (shipped recipes: {', '.join(SHIPPED)})")
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        raise RecoupError(f"{file}:{at} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    raw = raw or {}
    if isinstance(raw, dict):
        for text in overrides or []:
            apply_override(raw, *parse_override(text))
    return validate(raw, source=str(path or "default"))

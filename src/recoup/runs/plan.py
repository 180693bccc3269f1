"""A recipe -> the stages of a run, as a small DAG of plain-data :class:`StageSpec`.

Stage names: ``eval:dense``, ``compress:STEP``, ``eval:STEP``, ``recover:NAME``,
``eval:STEP+NAME`` (a recovery attached to the model it was fitted on, role ``recovered``) and
``eval:OTHER+NAME`` (attached unchanged to another compression level, role ``transfer``).
Order: dense, then per recovery its base compression and evaluations, the recovery, and its
transfers, then any remaining compression steps (sweep cells).
"""

from __future__ import annotations

import dataclasses

from recoup.recipe import Recipe


@dataclasses.dataclass
class StageSpec:
    """One stage: what it runs (``kind`` + ``params``), what it reads (``needs``) and what it means (``labels``)."""

    name: str
    kind: str  # compress | recover | evaluate
    params: dict
    needs: list[str]
    labels: dict  # role (dense|compressed|recovered|transfer), compression, recovery, method, sparsity, bits

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _eval_params(recipe: Recipe, tasks: list[str]) -> dict:
    ev = recipe.evaluate
    limits = {t: ev.limits[t] for t in tasks if t in ev.limits}
    return {"tasks": tasks, "limit": ev.limit, "limits": limits, "seqlen": ev.seqlen, "batch_size": ev.batch_size,
            "options": ev.options}


def _compress_labels(step: dict) -> dict:
    return {"compression": step["name"], "method": step["method"], "sparsity": step.get("sparsity"),
            "bits": step.get("bits"), "pattern": step.get("pattern")}


def build_plan(recipe: Recipe, fingerprint: str) -> list[StageSpec]:
    """The run's stages in execution order (every stage after the stages it needs)."""
    base = {"model": recipe.model, "fingerprint": fingerprint, "dtype": recipe.dtype, "device": recipe.device,
            "seed": recipe.seed}
    evaluation = _eval_params(recipe, recipe.evaluate.task_list())
    steps = {s["name"]: s for s in recipe.compress_steps()}
    plan: list[StageSpec] = []
    added: set[str] = set()

    def add(spec: StageSpec) -> None:
        if spec.name not in added:
            added.add(spec.name)
            plan.append(spec)

    def add_compression(name: str) -> None:
        step = steps[name]
        calibration = step.get("calibration") or dataclasses.asdict(recipe.calibration)
        config = {k: v for k, v in step.items() if k not in ("name", "calibration")}
        add(StageSpec(f"compress:{name}", "compress", {**base, "calibration": calibration, "config": config}, [],
                      {"role": "compressed", **_compress_labels(step)}))
        add(StageSpec(f"eval:{name}", "evaluate", {**base, "base": f"compress:{name}", "evaluate": evaluation},
                      [f"compress:{name}"], {"role": "compressed", **_compress_labels(step)}))

    if recipe.evaluate.dense:
        add(StageSpec("eval:dense", "evaluate", {**base, "evaluate": evaluation}, [],
                      {"role": "dense", "compression": "dense", "method": "dense", "sparsity": 0.0, "bits": None}))
    for rec in recipe.recover:
        on, name = rec["base"], rec["name"]
        add_compression(on)
        config = {k: v for k, v in rec.items() if k not in ("name", "method", "base", "transfer")}
        config.setdefault("seed", recipe.seed)
        add(StageSpec(f"recover:{name}", "recover",
                      {**base, "base": f"compress:{on}", "method": rec["method"], "config": config},
                      [f"compress:{on}"], {"role": "recovery", "recovery": name, **_compress_labels(steps[on])}))
        add(StageSpec(f"eval:{on}+{name}", "evaluate",
                      {**base, "base": f"compress:{on}", "recovery": f"recover:{name}", "evaluate": evaluation},
                      [f"compress:{on}", f"recover:{name}"],
                      {"role": "recovered", "recovery": name, **_compress_labels(steps[on])}))
        for target in rec.get("transfer") or []:
            if target == "dense":
                labels = {"compression": "dense", "method": "dense", "sparsity": 0.0, "bits": None}
                params = {**base, "recovery": f"recover:{name}", "evaluate": evaluation}
                needs = [f"recover:{name}"]
            else:
                add_compression(target)
                labels = _compress_labels(steps[target])
                params = {**base, "base": f"compress:{target}", "recovery": f"recover:{name}", "evaluate": evaluation}
                needs = [f"compress:{target}", f"recover:{name}"]
            add(StageSpec(f"eval:{target}+{name}", "evaluate", params, needs,
                          {"role": "transfer", "recovery": name, "trained_on": on, **labels}))
    for name in steps:
        add_compression(name)
    return plan

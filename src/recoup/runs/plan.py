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


def _compress_labels(step: dict) -> dict:
    return {
        "compression": step["name"],
        "method": step["method"],
        "sparsity": step.get("sparsity"),
        "bits": step.get("bits"),
        "pattern": step.get("pattern"),
    }


def build_plan(recipe: Recipe, fingerprint: str) -> list[StageSpec]:
    """The run's stages in execution order (every stage after the stages it needs).

    A stage's ``params`` are the flat keys of its typed job (:mod:`recoup.recipe.jobs`) plus ``base`` /
    ``recovery`` (the stages whose outputs it reads) and the model's ``fingerprint`` (for the cache key)."""
    base = {"model": recipe.model, "fingerprint": fingerprint}
    evaluation = dict(recipe.evaluation or {})
    steps = {s["name"]: s for s in recipe.compress_steps()}
    plan: list[StageSpec] = []
    added: set[str] = set()

    def add(spec: StageSpec) -> None:
        if spec.name not in added:
            added.add(spec.name)
            plan.append(spec)

    def add_compression(name: str) -> None:
        step = steps[name]
        params = {**base, **{k: v for k, v in step.items() if k != "name"}}
        add(StageSpec(f"compress:{name}", "compress", params, [], {"role": "compressed", **_compress_labels(step)}))
        add(
            StageSpec(
                f"eval:{name}",
                "evaluate",
                {**base, **evaluation, "base": f"compress:{name}"},
                [f"compress:{name}"],
                {"role": "compressed", **_compress_labels(step)},
            )
        )

    if recipe.evaluate.dense:
        add(
            StageSpec(
                "eval:dense",
                "evaluate",
                {**base, **evaluation},
                [],
                {"role": "dense", "compression": "dense", "method": "dense", "sparsity": 0.0, "bits": None},
            )
        )
    for rec in recipe.recover:
        on, name = rec["base"], rec["name"]
        add_compression(on)
        keys = {k: v for k, v in rec.items() if k not in ("name", "base", "transfer")}
        add(
            StageSpec(
                f"recover:{name}",
                "recover",
                {**base, **keys, "base": f"compress:{on}"},
                [f"compress:{on}"],
                {"role": "recovery", "recovery": name, **_compress_labels(steps[on])},
            )
        )
        add(
            StageSpec(
                f"eval:{on}+{name}",
                "evaluate",
                {**base, **evaluation, "base": f"compress:{on}", "recovery": f"recover:{name}"},
                [f"compress:{on}", f"recover:{name}"],
                {"role": "recovered", "recovery": name, **_compress_labels(steps[on])},
            )
        )
        for target in rec.get("transfer") or []:
            if target == "dense":
                labels = {"compression": "dense", "method": "dense", "sparsity": 0.0, "bits": None}
                params = {**base, **evaluation, "recovery": f"recover:{name}"}
                needs = [f"recover:{name}"]
            else:
                add_compression(target)
                labels = _compress_labels(steps[target])
                params = {**base, **evaluation, "base": f"compress:{target}", "recovery": f"recover:{name}"}
                needs = [f"compress:{target}", f"recover:{name}"]
            add(
                StageSpec(
                    f"eval:{target}+{name}",
                    "evaluate",
                    params,
                    needs,
                    {"role": "transfer", "recovery": name, "trained_on": on, **labels},
                )
            )
    for ex in recipe.export:
        add_compression(ex["base"])
        keys = {k: v for k, v in ex.items() if k not in ("name", "base", "recovery")}
        needs = [f"compress:{ex['base']}"] + ([f"recover:{ex['recovery']}"] if ex.get("recovery") else [])
        add(
            StageSpec(
                f"export:{ex['name']}",
                "export",
                {
                    **base,
                    **keys,
                    "base": f"compress:{ex['base']}",
                    **({"recovery": f"recover:{ex['recovery']}"} if ex.get("recovery") else {}),
                },
                needs,
                {"role": "export", "export": ex["name"], **_compress_labels(steps[ex["base"]])},
            )
        )
    for name in steps:
        add_compression(name)
    return plan


def describe_plan(plan: list[StageSpec]) -> list[str]:
    """One line per stage: name, what it reads, and its key settings (for ``recoup run --dry-run``)."""
    lines = []
    for i, spec in enumerate(plan, 1):
        p = spec.params
        if spec.kind == "compress":
            what = (
                f"{p['method']} sparsity={p.get('sparsity')} pattern={p.get('pattern')} bits={p.get('bits')} "
                f"group_size={p.get('group_size')}; calib {p['calib']} {p['nsamples']}x{p['seqlen']} seed {p['seed']}"
            )
        elif spec.kind == "recover":
            what = f"{p['method']} on {p['base']}"
        elif spec.kind == "export":
            what = f"{p['format']} of {p['base']}" + (f" + {p['recovery']}" if p.get("recovery") else "")
        else:
            reads = p.get("base") or p["model"]
            what = f"{', '.join(p['tasks'])} on {reads}" + (f" + {p['recovery']}" if p.get("recovery") else "")
        needs = f" (after {', '.join(spec.needs)})" if spec.needs else ""
        lines.append(f"{i:>2}. {spec.name:<28} {spec.kind:<9} {what}{needs}")
    return lines

"""The typed parameter object of each stage: what ``recoup compress|eval|recover`` parse their flags into,
what a recipe step builds, and what the stage functions (:mod:`recoup.runs.stages`) take.

A job is built from one *flat* mapping of keys (:meth:`Job.from_flat`): the job's own keys plus those of
the method it names (a compression method's options, a recovery method's config). The CLI flag of a key
is ``--key-with-dashes``; the recipe key is the key itself: the same names, the same validation, by
construction (:func:`keys` lists them for both). Every check that needs only the input runs here, before
a model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Mapping, Union

from recoup.artifact.export.base import ExportConfig
from recoup.config import Config, check
from recoup.data.bos import check_policy
from recoup.errors import RecoupError

DTYPES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")
STORAGES = ("packed", "dense")


@dataclasses.dataclass(frozen=True)
class Key:
    """One key of a job: its name, type annotation, default and the methods it belongs to (None = all)."""

    name: str
    type: Any
    default: Any
    methods: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def dataclass_keys(cls: type, skip: tuple[str, ...] = (), methods: tuple[str, ...] | None = None) -> list[Key]:
    hints = _hints(cls)
    return [
        Key(
            f.name,
            hints[f.name],
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None),
            methods,
        )
        for f in dataclasses.fields(cls)
        if f.name not in skip
    ]


def base_type(tp: Any) -> Any:
    """``int | None`` -> int; ``list[str]`` stays."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def check_device(device: str, allow_auto: bool = False) -> None:
    ok = device in ("cpu", "cuda") or device.startswith("cuda:") or (allow_auto and device == "auto")
    check(ok, f"unknown device '{device}'; use cpu, cuda or cuda:N" + (" or auto" if allow_auto else ""))
    if device.startswith("cuda"):
        import torch

        check(
            torch.cuda.is_available(),
            f"device {device} asked for, but this torch has no CUDA device "
            f"(torch {torch.__version__}); use --device cpu",
        )


def check_source(model: str) -> None:
    """A model source that names a local path must exist (one line, before anything loads)."""
    from recoup.model.load import ARTIFACT_MANIFEST, BUNDLED_ALIAS, did_you_mean, suggest_source

    check(isinstance(model, str) and bool(model.strip()), "name a model source (e.g. smollm2-135m)")
    if model == BUNDLED_ALIAS:
        return
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or model.endswith(".gguf")
    check(
        not looks_local or Path(model).expanduser().exists(),
        f"no such file or directory: '{model}'{did_you_mean(model)}",
    )
    suggest_source(model)
    path = Path(model).expanduser()
    if path.is_dir() and (path / ARTIFACT_MANIFEST).is_file():
        from recoup.artifact.store import read_manifest

        read_manifest(path, verify=False)  # an edited/foreign manifest: one line now (files are hashed at load)


def check_out(out: str | None, force: bool = False) -> None:
    """``out`` absent or an empty directory (or ``force``), and its parent writable."""
    if out is None:
        return
    path = Path(out).expanduser()
    if path.exists():
        check(path.is_dir(), f"--out '{out}' exists and is a file; choose a directory path")
        check(
            force or not any(path.iterdir()),
            f"--out '{out}' exists and is not empty; choose another directory or pass --force",
        )
    parent = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    check(writable(parent), f"--out '{out}': '{parent}' is not writable")


def writable(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried, not guessed from permission bits: root, read-only
    filesystems and /proc answer ``os.access`` wrongly)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _split_flat(data: Mapping[str, Any], own: list[str]) -> tuple[dict, dict]:
    mine = {k: v for k, v in data.items() if k in own}
    rest = {k: v for k, v in data.items() if k not in own}
    return mine, rest


@dataclasses.dataclass
class _MethodJob(Config):
    """A job whose ``config`` holds a method's keys: flat keys split between the two, and joined back."""

    @classmethod
    def own_keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "config"]

    def to_flat(self) -> dict:
        return {**{k: getattr(self, k) for k in self.own_keys()}, **self.config.to_dict()}


@dataclasses.dataclass
class CompressJob(_MethodJob):
    """``recoup compress MODEL --out DIR`` / a recipe ``compress:`` step: the model, the calibration windows
    (``calib`` corpus, ``nsamples`` x ``seqlen`` at ``seed``), the storage, and ``config`` (the method's keys)."""

    model: str = "smollm2-135m"
    out: str | None = None
    calib: str = "ptb"  # calibration corpus: ptb, wiki, a .txt/.jsonl file
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    dtype: str = "auto"  # the checkpoint's dtype on CUDA, float32 on CPU
    device: str = "auto"
    storage: str = "packed"
    force: bool = False
    bos: str = "auto"  # BOS policy of the calibration windows (recoup.data.bos): auto | always | never
    lazy: bool = True  # read each decoder layer from a local safetensors checkpoint when it is compressed
    config: Any = None  # CompressConfig

    POSITIONAL: ClassVar[tuple[str, ...]] = ("model",)

    @classmethod
    def from_flat(cls, data: Mapping[str, Any], where: str = "") -> "CompressJob":
        from recoup.compress import CompressConfig

        mine, rest = _split_flat(data, cls.own_keys())
        return cls(**mine, config=CompressConfig.from_dict(rest, where=where))

    def __post_init__(self) -> None:
        from recoup.evaluate.tasks.perplexity import check_corpus

        check_source(self.model)
        check(1 <= self.nsamples <= 1 << 16, f"nsamples must be in [1, 65536] (got {self.nsamples})")
        check(2 <= self.seqlen <= 1 << 17, f"seqlen must be in [2, 131072] (got {self.seqlen})")
        check(self.seed >= 0, f"seed must be >= 0 (got {self.seed})")
        check(self.dtype in DTYPES, f"unknown dtype '{self.dtype}'; use auto, float32, bfloat16 or float16")
        check(self.storage in STORAGES, f"unknown storage '{self.storage}'; use packed or dense")
        check_policy(self.bos)
        check_device(self.device, allow_auto=True)
        check_corpus(self.calib, "calib")
        check_out(self.out, self.force)
        check(self.config is not None, "a compression job needs its method config")


@dataclasses.dataclass
class EvalJob(Config):
    """``recoup eval MODEL`` / a recipe's ``evaluate:`` section (one evaluation of one model)."""

    model: str = "smollm2-135m"
    tasks: list[str] = dataclasses.field(default_factory=list)  # ppl:ptb, arc_easy, ... (default ppl:ptb)
    suite: str | None = None  # kick | zeroshot, added to tasks
    limit: int | None = None  # perplexity windows / examples per task
    limits: dict = dataclasses.field(default_factory=dict)  # per-task limit overriding limit
    seqlen: int = 2048  # perplexity window (and the Scorer's context cap)
    batch_size: int = 8
    seed: int = 0  # seeded task subsets
    bos: str = "auto"  # BOS policy of every window / request (recoup.data.bos): auto | always | never
    dtype: str = "auto"  # the checkpoint's dtype on CUDA, float32 on CPU
    device: str = "cpu"
    device_map: str | None = None  # auto: accelerate's big-model placement (GPUs, then CPU); overrides device
    options: dict = dataclasses.field(default_factory=dict)  # task-family options (shots, ...)
    judge_url: str | None = None
    judge_model: str | None = None
    judge_key_env: str = "OPENAI_API_KEY"
    judge_local: str | None = None
    judge_retries: int = 3
    judge_timeout: float = 120.0  # seconds per judge request (a judge on a CPU needs minutes for a long reply)
    judge_max_tokens: int = 512  # the judge's reply length cap
    recovery: str | None = None  # a saved recovery directory to attach
    prompt_text: str | None = None  # a hard prompt (text prepended as embeddings, never scored)
    json: str | None = None  # write the results here

    POSITIONAL: ClassVar[tuple[str, ...]] = ("model",)

    @classmethod
    def from_flat(cls, data: Mapping[str, Any], where: str = "") -> "EvalJob":
        return cls.from_dict(data, where=where)

    def to_flat(self) -> dict:
        return self.to_dict()

    def __post_init__(self) -> None:
        from recoup.evaluate.runner import resolve
        from recoup.evaluate.tasks import parse_options

        check_source(self.model)
        if isinstance(self.tasks, str):
            self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
            check(bool(self.tasks), "tasks is empty; name at least one task, e.g. ppl:ptb")
        if not self.tasks and not self.suite:
            self.tasks = ["ppl:ptb"]
        check(self.limit is None or self.limit >= 1, f"limit must be a positive integer (got {self.limit})")
        check(2 <= self.seqlen <= 1 << 17, f"seqlen must be in [2, 131072] (got {self.seqlen})")
        check(self.batch_size >= 1, f"batch_size must be >= 1 (got {self.batch_size})")
        check(self.seed >= 0, f"seed must be >= 0 (got {self.seed})")
        check_policy(self.bos)
        check(self.judge_retries >= 1, f"judge_retries must be >= 1 (got {self.judge_retries})")
        check(self.judge_timeout > 0, f"judge_timeout must be > 0 seconds (got {self.judge_timeout})")
        check(self.judge_max_tokens >= 16, f"judge_max_tokens must be >= 16 (got {self.judge_max_tokens})")
        check(self.dtype in DTYPES, f"unknown dtype '{self.dtype}'; use auto, float32, bfloat16 or float16")
        check_device(self.device)
        check(self.device_map in (None, "auto"), f"unknown device_map '{self.device_map}'; use auto (or leave it out)")
        check(self.recovery is None or self.prompt_text is None, "give either recovery or prompt_text, not both")
        check(self.prompt_text is None or bool(self.prompt_text.strip()), "prompt_text is empty")
        if self.recovery is not None:
            from recoup.model.load import check_finite_files
            from recoup.recover.methods import saved_method

            saved_method(self.recovery)  # a readable recovery directory, before the model loads
            check_finite_files(Path(self.recovery).expanduser(), f"recovery '{self.recovery}'")
        self.options = {**parse_options([f"{k}={v}" for k, v in self.options.items()])} if self.options else {}
        # the suite stays named, so a job rebuilt from its keys finds the same skipped tasks again
        self.tasks, self.skipped = resolve(self.tasks, self.suite, self.options)
        for task, n in self.limits.items():
            check(task in self.tasks, f"limits names '{task}', which is not among the tasks")
            check(
                n is None or (isinstance(n, int) and not isinstance(n, bool) and n >= 1),
                f"limits.{task} must be a positive integer or null (got {n!r})",
            )
        if self.judge_url or self.judge_model or self.judge_local:
            from recoup.evaluate.judge import check_judge

            check_judge(self.judge_url, self.judge_model, self.judge_key_env, self.judge_local)


@dataclasses.dataclass
class RecoverJob(_MethodJob):
    """``recoup recover MODEL --method M --out DIR`` / a recipe ``recover:`` step: ``config`` holds the
    method's keys (its typed config from the recovery registry)."""

    model: str = "smollm2-135m"
    method: str = "soft-prompt"
    out: str | None = None
    dtype: str = "auto"  # the checkpoint's dtype on CUDA, float32 on CPU
    device: str = "cpu"
    device_map: str | None = None  # auto: accelerate's big-model placement (GPUs, then CPU); overrides device
    force: bool = False
    lazy: bool = True  # a method that streams layers (eora) reads the artifact one decoder layer at a time on CPU
    config: Any = None

    POSITIONAL: ClassVar[tuple[str, ...]] = ("model",)

    @classmethod
    def from_flat(cls, data: Mapping[str, Any], where: str = "") -> "RecoverJob":
        from recoup.recover.methods import RECOVERIES

        mine, rest = _split_flat(data, cls.own_keys())
        method = mine.get("method", cls.method)
        spec = RECOVERIES.get(str(method))
        allowed = spec.config.field_names()
        owners = recovery_key_owners()
        for key in rest:
            if key not in allowed:
                if key in owners:
                    raise RecoupError(
                        f"{where + ': ' if where else ''}'{key}' does not apply to method {method} "
                        f"(it is a key of {', '.join(owners[key])})"
                    )
                close = difflib.get_close_matches(key, allowed + cls.own_keys(), n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise RecoupError(
                    f"{where + ': ' if where else ''}unknown key '{key}' for method {method}{hint} "
                    f"allowed: {', '.join(cls.own_keys() + allowed)}"
                )
        return cls(**mine, config=spec.config.from_dict(rest, where=where or str(method)))

    def __post_init__(self) -> None:
        from recoup.recover.methods import RECOVERIES

        RECOVERIES.get(self.method)
        check_source(self.model)
        check(self.dtype in DTYPES, f"unknown dtype '{self.dtype}'; use auto, float32, bfloat16 or float16")
        check_device(self.device)
        check(self.device_map in (None, "auto"), f"unknown device_map '{self.device_map}'; use auto (or leave it out)")
        check_out(self.out, self.force)
        check(self.config is not None, "a recovery job needs its method config")
        if hasattr(self.config, "check_job"):  # a method's checks of the model and out (tune: an artifact)
            self.config.check_job(self.model, self.out)
        data = getattr(self.config, "data", None)
        if data:
            from recoup.data.corpora import check_text_file
            from recoup.data.windows import corpus_names
            from recoup.evaluate.tasks.perplexity import check_corpus

            for name in corpus_names(data):
                if not name.endswith((".jsonl", ".jsonl.gz")):
                    check_corpus(name, "data")
                else:
                    check_text_file(name, "data")
        task = getattr(self.config, "task", None)
        if task:
            from recoup.data.multiple_choice import ZERO_SHOT_TASKS
            from recoup.registry import unknown_name_message

            check(task in ZERO_SHOT_TASKS, unknown_name_message("tuning task", task, ZERO_SHOT_TASKS))


@dataclasses.dataclass
class ExportJob(ExportConfig):
    """``recoup export ARTIFACT --format F --out DIR`` / a recipe ``export:`` step: the keys of
    :class:`recoup.artifact.export.ExportConfig` (``source`` is the artifact, the command's positional)."""

    POSITIONAL: ClassVar[tuple[str, ...]] = ("source",)
    FLAG_HELP: ClassVar[dict[str, str]] = {
        "source": "a recoup artifact directory (the --out of `recoup compress`)",
        "format": "hf (dense safetensors: transformers) | compressed-tensors (integer codes: vLLM, SGLang, "
        "transformers) | gguf (Q4_0/Q4_1/Q8_0 blocks from the same codes: llama.cpp, Ollama)",
        "out": "directory to write (must not exist or be empty)",
        "dtype": "float32 | float16 | bfloat16: unquantized tensors and scales (default: the artifact's dtype)",
        "recovery": "a saved recovery (LoRA, soft prompt, ...) to write beside the model as OUT/recovery, its "
        "base_model_name_or_path pointing at OUT",
        "merge": "merge the --recovery LoRA into the weights (--format hf only; the result is dense)",
        "gguf_type": "GGUF type of the quantized linears: F32, F16, BF16, Q4_0, Q4_1, Q8_0 (default: the type the "
        "artifact's grid maps onto exactly, else the --dtype float type)",
    }

    @classmethod
    def from_flat(cls, data: Mapping[str, Any], where: str = "") -> "ExportJob":
        return cls.from_dict(data, where=where)

    def to_flat(self) -> dict:
        return self.to_dict()

    def __post_init__(self) -> None:
        check(bool(self.format), "export needs --format (hf, compressed-tensors or gguf)")
        super().__post_init__()


def recovery_key_owners() -> dict[str, list[str]]:
    """Every recovery-method config key -> the methods that take it."""
    from recoup.recover.methods import RECOVERIES

    owners: dict[str, list[str]] = {}
    for name in RECOVERIES.names():
        for key in RECOVERIES.get(name).config.field_names():
            owners.setdefault(key, []).append(name)
    return owners


def _with_method_keys(
    own: list[Key], configs: list[type], owners: dict[str, list[str]], show_default: bool = True
) -> list[Key]:
    """``own`` keys, then each method config's keys not seen yet (first declaration wins), tagged with their methods."""
    out, seen = list(own), {k.name for k in own}
    for cls in configs:
        for key in dataclass_keys(cls):
            if key.name not in seen:
                seen.add(key.name)
                out.append(
                    dataclasses.replace(
                        key, methods=tuple(owners[key.name]), default=key.default if show_default else None
                    )
                )
    return out


def keys(kind: str) -> list[Key]:
    """Every key of a stage kind (compress | evaluate | recover | export): its CLI flags and recipe keys, in order.

    Method keys are typed from the method that declares them (first declaration wins) and carry the
    methods they belong to."""
    if kind == "compress":
        from recoup.compress import METHODS, CompressConfig
        from recoup.compress.config import option_owners

        own = dataclass_keys(CompressJob, skip=("config",)) + dataclass_keys(CompressConfig, skip=("options",))
        return _with_method_keys(own, [METHODS.get(n).options for n in METHODS.names()], option_owners())
    if kind == "evaluate":
        return dataclass_keys(EvalJob)
    if kind == "export":
        return dataclass_keys(ExportJob)
    if kind == "recover":
        from recoup.recover.methods import RECOVERIES

        return _with_method_keys(
            dataclass_keys(RecoverJob, skip=("config",)),
            [RECOVERIES.get(n).config for n in RECOVERIES.names()],
            recovery_key_owners(),
            show_default=False,
        )  # defaults differ per method: each config applies its own
    raise RecoupError(f"unknown stage kind '{kind}'")


JOBS: dict[str, type] = {"compress": CompressJob, "evaluate": EvalJob, "recover": RecoverJob, "export": ExportJob}

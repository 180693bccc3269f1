"""Lazy weights: a model skeleton whose tensors are read from the checkpoint's safetensors files when needed.

:func:`skeleton` builds the model from its config with every parameter on the ``meta`` device (no memory;
buffers such as rotary frequencies are computed as usual). :class:`LazyWeights` then reads the tensors of
one module (a decoder layer, the embeddings) from the checkpoint's safetensors shards into it, in the dtype
asked for (float32 for the statistics and solves, whatever the checkpoint stores; bf16 -> float32 is exact),
and frees them again (back to ``meta``). Tensors are read with plain file reads (:class:`TensorFile`), so no
file stays mapped. A tied parameter (embeddings = lm_head) is one tensor, read once for both names.

Host memory is then what the caller holds at once (one decoder layer plus the activations for the layer
streamer, :mod:`recoup.model.streamer`), not the whole model.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from recoup.errors import RecoupError
from recoup.memory import return_freed_tensors_to_the_system, trim_heap
from recoup.model.load import LoadedModel

INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} of the checkpoint in ``folder`` (its index, else every shard's header)."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        return {name: folder / f for name, f in weight_map.items()}
    where: dict[str, Path] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            where.update({k: f for k in fh.keys()})
    if not where:
        raise RecoupError(f"'{folder}' holds no safetensors weights; lazy loading reads safetensors checkpoints")
    return where


def skeleton(folder: Path, dtype: torch.dtype, trust_remote_code: bool = False, config: Any = None) -> nn.Module:
    """The causal LM of the checkpoint in ``folder`` (``config``: its transformers config, default read from the
    folder) with its parameters on ``meta`` (``dtype``), in eval mode, with the checkpoint's generation config."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if config is None:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # from_config on meta leaves tied parameters (embeddings = lm_head) apart
    if (Path(folder) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return model.eval()


class LazyWeights:
    """Reads the tensors of ``model``'s modules from the checkpoint in ``folder`` on demand, in ``dtype``.

    ``reads`` counts every tensor read by name (a test checks each is read once); :meth:`alive` lists the
    parameters that currently hold memory."""

    def __init__(self, model: nn.Module, folder: str | Path, dtype: torch.dtype = torch.float32) -> None:
        self.model, self.folder, self.dtype = model, Path(folder), dtype
        return_freed_tensors_to_the_system()  # each layer's tensors come and go: keep the heap from growing
        self.files = self._files()
        self.reads: Counter[str] = Counter()
        prefix = getattr(model, "base_model_prefix", "") or ""
        # every name of every parameter (a tied one has several), and where each is stored
        self._slots: dict[int, list[tuple[nn.Module, str, str]]] = {}
        for mname, mod in model.named_modules(remove_duplicate=False):
            for leaf, p in mod._parameters.items():
                if p is not None:
                    self._slots.setdefault(id(p), []).append((mod, leaf, f"{mname}.{leaf}" if mname else leaf))
        self._key: dict[int, str] = {}
        missing = []
        for pid, slots in self._slots.items():
            names = [full for _, _, full in slots]
            found = [n for n in names if n in self.files]
            found += [
                n[len(prefix) + 1 :]
                for n in names
                if prefix and n.startswith(prefix + ".") and n[len(prefix) + 1 :] in self.files
            ]
            if not found:
                missing.append(names[0])
            else:
                self._key[pid] = found[0]
        if missing:
            raise RecoupError(
                f"the checkpoint in '{self.folder}' does not hold '{missing[0]}' under the model's name "
                f"(and {len(missing) - 1} more); it cannot be read layer by layer"
            )

    def _files(self) -> dict[str, Path]:
        """{stored tensor name: file} (a subclass may store some tensors otherwise)."""
        return checkpoint_files(self.folder)

    def _params(self, module: nn.Module) -> Iterator[nn.Parameter]:
        seen: set[int] = set()
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield p

    def _current(self, p: nn.Parameter) -> nn.Parameter:
        if id(p) in self._slots:
            return p
        raise RecoupError("a parameter given to free was never this model's (or was freed already)")

    def _set(self, old: nn.Parameter, data: torch.Tensor) -> None:
        new = nn.Parameter(data, requires_grad=False)
        for mod, leaf, full in self._slots.pop(id(old)):
            mod._parameters[leaf] = new
            self._slots.setdefault(id(new), []).append((mod, leaf, full))
        self._key[id(new)] = self._key.pop(id(old))

    def load(self, module: nn.Module, device: torch.device | str = "cpu") -> None:
        """Read every parameter of ``module`` not yet in memory from the checkpoint, as ``dtype`` on ``device``."""
        self.load_params(list(self._params(module)), device)

    def free(self, module: nn.Module) -> None:
        """Give every parameter of ``module`` back (to ``meta``), whatever another module still ties to it."""
        self.free_params(list(self._params(module)))

    @torch.no_grad()
    def load_params(self, params: list[nn.Parameter], device: torch.device | str = "cpu") -> None:
        """Read ``params`` (those still on ``meta``) from the checkpoint, as ``dtype`` on ``device``."""
        for p in params:
            if p.device.type == "meta":
                key = self._key[id(p)]
                t = self._tensor(key)
                if tuple(t.shape) != tuple(p.shape):
                    raise RecoupError(
                        f"checkpoint tensor '{key}' is {tuple(t.shape)}, the model expects "
                        f"{tuple(p.shape)}; the config does not match the weights"
                    )
                self.reads[key] += 1
                self._set(p, t.to(device=device, dtype=self.dtype))
                del t

    def _tensor(self, key: str) -> torch.Tensor:
        """The stored tensor ``key``, as stored (a subclass may decode it)."""
        return TensorFile(self.files[key])[key]

    @torch.no_grad()
    def free_params(self, params: list[nn.Parameter]) -> None:
        """Give ``params`` back (to ``meta``). A parameter object replaced since it was listed is found by name."""
        for p in params:
            p = self._current(p)
            if p.device.type != "meta":
                self._set(p, torch.empty(p.shape, dtype=p.dtype, device="meta"))
        trim_heap()  # what the module's work freed in glibc's heap goes back too, not only its tensors

    def read(self, name: str) -> torch.Tensor:
        """The checkpoint tensor of the model's parameter ``name`` (a tied name resolves to the stored one), in
        ``dtype`` on CPU, without keeping it."""
        param = self.model.get_parameter(name)
        key = self._key[id(param)]
        self.reads[key] += 1
        return self._tensor(key).to(self.dtype)

    def read_blocks(self, name: str) -> tuple[list[int], torch.dtype, Iterator[torch.Tensor]]:
        """(shape, ``dtype``, its blocks of rows in ``dtype``) of the checkpoint tensor of parameter ``name``: what
        :meth:`read` gives, one block of rows at a time (a conversion never holds the whole tensor twice)."""
        from recoup.blocks import row_blocks

        key = self._key[id(self.model.get_parameter(name))]
        self.reads[key] += 1
        fh = TensorFile(self.files[key])
        shape = list(fh.header[key]["shape"])
        rows = shape[0] if shape else 1
        blocks = row_blocks(rows, max(1, math.prod(shape) // max(1, rows)))
        return shape, self.dtype, (fh.rows(key, r.start, r.stop).to(self.dtype) for r in blocks)

    def alive(self) -> list[str]:
        """Names of the parameters that hold memory now (one name per tensor)."""
        return [
            slots[0][2] for slots in self._slots.values() if slots[0][0]._parameters[slots[0][1]].device.type != "meta"
        ]


def load_lazy(source: str, dtype: str | torch.dtype = "float32") -> tuple[LoadedModel, LazyWeights] | None:
    """``source`` (a local or bundled safetensors checkpoint) as a skeleton with its tokenizer, and its lazy
    weights in ``dtype`` (``auto``: float32, as on CPU); None when it cannot be read layer by layer (a hub id,
    an artifact, checkpoint names that differ from the model's)."""
    import logging

    from transformers import AutoTokenizer

    from recoup.model.load import resolve_dtype, resolve_source

    kind, path = resolve_source(source)
    if kind not in ("bundled", "gguf", "dir") or path is None:
        return None
    torch_dtype = resolve_dtype(dtype, "cpu", path)
    try:
        model = skeleton(path, torch_dtype)
        weights = LazyWeights(model, path, torch_dtype)
    except RecoupError as exc:
        logging.getLogger(__name__).info("reading the whole model instead of layer by layer: %s", exc)
        return None
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, path=path), weights


class TensorFile:
    """A safetensors file read one tensor at a time with plain reads (no memory map, so nothing of the file
    counts towards the process's memory once a tensor is dropped): ``name in f``, ``f[name]``, ``f.keys()``."""

    DTYPES = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }

    def __init__(self, path: str | Path) -> None:
        import struct

        self.path = Path(path)
        with open(self.path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        self.start, self.header = 8 + n, header

    def keys(self) -> list[str]:
        return list(self.header)

    def __contains__(self, name: object) -> bool:
        return name in self.header

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.header[name]["shape"]
        return self.rows(name, 0, shape[0] if shape else 1)

    def dtype(self, name: str) -> torch.dtype:
        info = self.header[name]
        dtype = self.DTYPES.get(info["dtype"])
        if dtype is None:
            raise RecoupError(f"'{self.path}': tensor '{name}' has dtype {info['dtype']}, which recoup does not read")
        return dtype

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``name`` (along its first dimension; a 0-d tensor is one row), read
        alone: a big tensor (an 8B model's embedding matrix) can be converted a block of rows at a time."""
        info, dtype = self.header[name], self.dtype(name)
        shape = list(info["shape"])
        a, b = info["data_offsets"]
        n_rows = shape[0] if shape else 1
        row_bytes = (b - a) // max(1, n_rows)
        start, stop = max(0, start), min(stop, n_rows)
        buf = bytearray(max(0, stop - start) * row_bytes)
        with open(self.path, "rb") as fh:
            fh.seek(self.start + a + start * row_bytes)
            if fh.readinto(buf) != len(buf):
                raise RecoupError(f"'{self.path}' is truncated (tensor '{name}')")
        out_shape = [max(0, stop - start), *shape[1:]] if shape else []
        if not buf:
            return torch.empty(out_shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(out_shape)

    def copy_bytes(self, name: str, out: Any, chunk: int = 64 << 20) -> None:
        """Write tensor ``name``'s raw bytes to the open file ``out``, ``chunk`` bytes at a time."""
        a, b = self.header[name]["data_offsets"]
        with open(self.path, "rb") as fh:
            fh.seek(self.start + a)
            left = b - a
            while left:
                piece = fh.read(min(chunk, left))
                if not piece:
                    raise RecoupError(f"'{self.path}' is truncated (tensor '{name}')")
                out.write(piece)
                left -= len(piece)

"""An artifact written one decoder layer at a time, for compression with lazy weights (:mod:`recoup.model.lazy`).

Each compressed layer's tensors (packed where :func:`recoup.artifact.packing.encode_linear` reproduces them bit
for bit, else dense) go to a spool file beside the artifact as soon as the layer is done, and the layer is
freed. At the end the embeddings, final norm and head are read from the checkpoint one tensor at a time, and
the spool files are merged into ``model.safetensors`` and ``packed_weights.safetensors`` with exactly the
bytes :func:`safetensors.torch.save_file` would write for the whole state dict (same header, same order),
so the artifact, its file hashes and its manifest are those of :func:`recoup.artifact.store.save_artifact`
on the same weights; no whole-model state dict is ever in memory.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recoup.artifact.packing import PACKED_FILE, encode_linear
from recoup.artifact.report import CompressReport
from recoup.artifact.store import QPARAMS_FILE, artifact_fields, finish_artifact, grid_tensors, prepare_target
from recoup.errors import RecoupError
from recoup.model.anatomy import anatomy
from recoup.model.lazy import LazyWeights, TensorFile
from recoup.model.load import LoadedModel

SAFE_DTYPES = TensorFile.DTYPES  # safetensors dtype name -> torch dtype


def merge_safetensors(path: Path, sources: dict[str, Path], metadata: dict[str, str], delete: bool = False) -> None:
    """Write the tensors ``sources`` names (each read from the safetensors file given for it) to ``path`` as one
    safetensors file, byte for byte what ``save_file`` writes for them all, one tensor in memory at a time.
    ``delete``: remove each source file once the last of its tensors named in ``sources`` is written (the disk
    then holds the spool and the merged file once, not twice)."""
    from safetensors import safe_open
    from safetensors.torch import save as save_bytes

    info: dict[str, tuple[str, list[int]]] = {}
    for f in sorted(set(sources.values())):
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                if sources.get(name) == f:
                    sl = fh.get_slice(name)
                    info[name] = (sl.get_dtype(), list(sl.get_shape()))
    if set(info) != set(sources):
        raise RecoupError(f"spooled tensors missing: {sorted(set(sources) - set(info))[:3]}")
    # the order safetensors writes: its own serializer on empty stand-ins (the order depends on dtype and name only)
    stand = save_bytes({n: torch.empty(0, dtype=SAFE_DTYPES[d]) for n, (d, _) in info.items()}, metadata=metadata)
    (n_head,) = struct.unpack("<Q", stand[:8])
    order = [k for k in json.loads(stand[8 : 8 + n_head]) if k != "__metadata__"]
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        dtype, shape = info[name]
        size = torch.empty(0, dtype=SAFE_DTYPES[dtype]).element_size()
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    left = Counter(sources.values())  # a spool file is deleted once its last tensor is written (disk: one copy)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for name in order:
            TensorFile(sources[name]).copy_bytes(name, out)  # bytes as they are, a chunk in memory at a time
            left[sources[name]] -= 1
            if not left[sources[name]] and delete:
                sources[name].unlink()


class LayerwiseWriter:
    """Writes the artifact of a lazily loaded model (``loaded.model`` a skeleton, ``weights`` its checkpoint) one
    compressed decoder layer at a time: :meth:`add_layer` while the layer holds its weights, :meth:`finish`
    once every layer is done."""

    def __init__(
        self, loaded: LoadedModel, weights: LazyWeights, out_dir: str | Path, storage: str, bits: int | None
    ) -> None:
        self.loaded, self.weights, self.storage, self.bits = loaded, weights, storage, bits
        self.out, self.tmp = prepare_target(out_dir, storage)
        self.spool = self.tmp.with_name(self.tmp.name + ".spool")
        shutil.rmtree(self.spool, ignore_errors=True)
        self.spool.mkdir()
        self.anat = anatomy(loaded.model)
        self.dense: dict[str, Path] = {}
        self.packed: dict[str, Path] = {}
        self.grids: dict[str, Path] = {}  # spooled quantization grids, by tensor name in the grids file
        self.metas: dict[str, dict[str, Any]] = {}

    @torch.no_grad()
    def add_layer(
        self, i: int, layer: nn.Module, names: list[str], qparams: dict[str, dict[str, torch.Tensor]]
    ) -> None:
        """Spool decoder layer ``i`` (its weights in memory, compressed): ``names`` are its compressed linears'
        full names in the order the report lists them. Their quantization grids are spooled too and taken out of
        ``qparams`` (the engine's dict, which would otherwise hold every layer's grids until the end: ~13 MB a
        layer of an 8B model, 0.4 GB over 32 layers)."""
        from safetensors.torch import save_file

        prefix = f"{self.anat.spec.layers}.{i}."
        tensors = {prefix + k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}
        packed: dict[str, torch.Tensor] = {}
        if self.storage == "packed":
            modules = dict(layer.named_modules())
            for name in names:
                w = self.anat.weight_matrix(modules[name[len(prefix) :]]).detach().cpu()
                enc = encode_linear(w, qparams.get(name), self.bits)
                if enc is None:
                    continue
                key = f"{name}.weight"
                self.metas[key] = {"linear": name, **enc.meta}
                packed.update({f"{key}.{suffix}": t.contiguous() for suffix, t in enc.tensors.items()})
                del tensors[key]
        self._spool(f"layer{i}", tensors, self.dense, save_file)
        self._spool(f"layer{i}.packed", packed, self.packed, save_file)
        grids = {name: qparams.pop(name) for name in names if name in qparams}
        self._spool(f"layer{i}.grids", grid_tensors(grids, self.storage), self.grids, save_file)

    def _spool(self, stem: str, tensors: dict[str, torch.Tensor], into: dict[str, Path], save_file) -> None:
        if tensors:
            f = self.spool / f"{stem}.safetensors"
            save_file(tensors, str(f))
            into.update({k: f for k in tensors})

    def _spool_blocks(self, stem: str, name: str, shape: list[int], dtype: torch.dtype, blocks) -> None:
        """Spool one tensor of ``shape`` and ``dtype`` given as its consecutive blocks of rows."""
        f = self.spool / f"{stem}.safetensors"
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        dtype_name = {v: k for k, v in SAFE_DTYPES.items()}[dtype]
        raw = json.dumps({name: {"dtype": dtype_name, "shape": shape, "data_offsets": [0, size]}}).encode()
        raw += b" " * (-len(raw) % 8)
        written = 0
        with open(f, "wb") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            for block in blocks:
                data = block.to(dtype).contiguous().reshape(-1).view(torch.uint8)
                out.write(data.numpy().data)
                written += data.numel()
        if written != size:
            raise RecoupError(f"'{name}' was not read whole from the checkpoint ({written} of {size} bytes)")
        self.dense[name] = f

    @torch.no_grad()
    def finish(self, report: CompressReport) -> Path:
        """Read what lies outside the decoder layers from the checkpoint, merge the spool into the artifact's
        files, write its config, tokenizer, grids and manifest, and move it into place."""
        from safetensors.torch import save_file
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        model = self.loaded.model
        try:
            kept = remove_tied_weights_from_state_dict(model.state_dict(), model)
            params = dict(model.named_parameters(remove_duplicate=False))
            for n, name in enumerate(k for k in kept if k not in self.dense and k not in self.metas):
                if name in params:  # converted a block of rows at a time, straight into its spool file
                    self._spool_blocks(f"rest{n}", name, *self.weights.read_blocks(name))
                else:
                    self._spool(
                        f"rest{n}", {name: model.get_buffer(name).detach().cpu().contiguous()}, self.dense, save_file
                    )
            missing = [k for k in kept if k not in self.dense and k not in self.metas]
            if missing:
                raise RecoupError(f"the layer-by-layer artifact lacks {missing[0]}")
            model.save_pretrained(str(self.tmp), safe_serialization=True, state_dict={})  # config files only
            merge_safetensors(
                self.tmp / "model.safetensors",
                {k: self.dense[k] for k in kept if k in self.dense},
                {"format": "pt"},
                delete=True,
            )
            if self.metas:
                merge_safetensors(self.tmp / PACKED_FILE, self.packed, {"format": "recoup-packed"}, delete=True)
            # grids not spooled with a layer (none today) join the spooled ones: one file, as save_artifact writes
            self._spool("grids", grid_tensors(report.qparams, self.storage), self.grids, save_file)
            if self.grids:
                merge_safetensors(self.tmp / QPARAMS_FILE, self.grids, {}, delete=True)
            shutil.rmtree(self.spool, ignore_errors=True)
            return finish_artifact(
                self.loaded,
                artifact_fields(self.loaded, report),
                {},  # the grids file is written
                self.storage,
                self.tmp,
                self.out,
                self.metas,
                None,
            )
        finally:
            self.close()

    def close(self) -> None:
        """Remove the temporary folders (after :meth:`finish` or when the compression failed)."""
        shutil.rmtree(self.spool, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

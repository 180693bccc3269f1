"""An artifact read one decoder layer at a time: its skeleton model and lazy weights that decode a packed linear
(codes, masks, kept values and its grid) when its layer is reached, so a recovery that streams layers
(EoRA) never holds the whole compressed model. The weights are those :func:`recoup.artifact.store.load_artifact`
gives, value for value, in the same dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch

from recoup.artifact.packing import decode_linear
from recoup.artifact.store import QPARAMS_FILE, artifact_config, packed_tensors, read_manifest
from recoup.model.anatomy import anatomy
from recoup.model.lazy import LazyWeights, TensorFile, checkpoint_files, skeleton
from recoup.model.load import LoadedModel


class ArtifactWeights(LazyWeights):
    """:class:`LazyWeights` of an artifact: dense tensors come from ``model.safetensors``, a packed linear's weight
    is decoded from the packed file with its grid (read alone from the grids file) when it is loaded."""

    def __init__(
        self, model: torch.nn.Module, folder: str | Path, dtype: torch.dtype, metas: dict, packed: Path | None
    ) -> None:
        self.metas, self.packed = metas, TensorFile(packed) if packed is not None else None
        grids = Path(folder) / QPARAMS_FILE
        self.grids = TensorFile(grids) if grids.is_file() else None
        self.conv1d = anatomy(model).spec.conv1d
        super().__init__(model, folder, dtype)

    def _files(self) -> dict[str, Path]:
        # model.safetensors' tensors (the grids and packed files are safetensors too, but not weights), then the
        # packed linears' weights, decoded from the packed file
        other = {QPARAMS_FILE} | ({self.packed.path.name} if self.packed is not None else set())
        files = {k: v for k, v in checkpoint_files(self.folder).items() if v.name not in other}
        files.update({key: self.packed.path for key in self.metas})
        return files

    def _tensor(self, key: str) -> torch.Tensor:
        meta = self.metas.get(key)
        if meta is None:
            return super()._tensor(key)
        parts = {s: self.packed[f"{key}.{s}"] for s in ("codes", "mask", "values") if f"{key}.{s}" in self.packed}
        w = decode_linear(meta, parts, self.grid(meta.get("linear", "")), self.dtype)
        return w.t() if self.conv1d else w

    def grid(self, linear: str) -> dict[str, torch.Tensor] | None:
        """The grid of one linear (scale, zero, g_idx), read alone; zero points stored as uint8 read as float."""
        if self.grids is None or f"{linear}.scale" not in self.grids:
            return None
        out = {k: self.grids[f"{linear}.{k}"] for k in ("scale", "zero", "g_idx") if f"{linear}.{k}" in self.grids}
        if out.get("zero") is not None and out["zero"].dtype == torch.uint8:
            out["zero"] = out["zero"].float()
        return out


def load_artifact_lazy(path: str | Path, dtype: str | torch.dtype = "float32") -> tuple[LoadedModel, ArtifactWeights]:
    """The artifact at ``path`` as a skeleton model (parameters on ``meta``) with its tokenizer and manifest, and
    its lazy weights in ``dtype`` (``auto``: float32 on CPU, as :func:`recoup.artifact.store.load_artifact`)."""
    from transformers import AutoConfig, AutoTokenizer

    from recoup.model.load import resolve_dtype

    path = Path(path).expanduser().resolve()
    manifest = read_manifest(path)
    metas, packed = packed_tensors(path, manifest)
    torch_dtype = resolve_dtype(dtype, "cpu", path)
    config = artifact_config(path) or AutoConfig.from_pretrained(str(path))
    model = skeleton(path, torch_dtype, config=config)
    weights = ArtifactWeights(model, path, torch_dtype, metas, packed)
    tokenizer = AutoTokenizer.from_pretrained(str(path), config=config)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    manifest["artifact_dir"] = str(path)
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(path), path=path, manifest=manifest), weights

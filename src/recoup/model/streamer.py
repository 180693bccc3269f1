"""The layer streamer: the one place that walks a model's decoder layers with captured calibration inputs.

A layer-wise method (the compression engine, EoRA, any later block-wise reconstruction) needs the same
three things: the first decoder layer's inputs on the calibration windows, the other arguments each layer
is called with, and a way to run one layer at a time on those inputs, its outputs becoming the next layer's.

- Capture: a pre-hook on the first layer grabs its inputs and raises :class:`StopForward`, so nothing after
  it runs; the other positional and keyword arguments of every layer (attention masks, rotary embeddings,
  which can differ per layer, e.g. Gemma 3's local/global layers) are recorded from one single-window
  forward. They broadcast over the batch.
- Placement: *in place* (every layer stays where the model is), or *offload* (the execution device
  differs from the model's, or is asked for): the modules that run before the first layer (embeddings,
  positional and rotary embeddings; not the final norm or lm_head) visit the execution device for the
  capture, whose record pass replaces the layers by pass-throughs (masks and rotary embeddings do not depend
  on layer outputs), and each decoder layer moves to the execution device while it is worked on, then back.
  Device memory is then one layer plus the activations plus what the method keeps.
- Activations: (nsamples, seqlen, hidden), held once for the whole pass and overwritten in place by each
  layer's outputs (:meth:`LayerStreamer.propagate`), batch by batch. By default they are held on the execution
  device in the dtype the first layer receives (the model's: float32 on CPU), exactly as the layers produce them.
  ``activation_dtype`` stores them narrower: bfloat16 halves them and rounds every layer's inputs to 8 mantissa
  bits (relative error <= 2**-9 per value, one rounding per layer boundary, not accumulated inside a layer);
  float16 keeps 11 bits (<= 2**-12) but overflows past 65504 (refused with one line when a value does). Each
  batch is cast back to the layer's dtype for the layer call, so the layer, its hooks and every statistic
  compute as before, from the rounded inputs. ``budget_bytes``: activations larger than it live in a
  memory-mapped file in a temporary folder (``TMPDIR``), on the host whatever the execution device; each batch
  is copied to the execution device for its call and its output written back, and its pages are then dropped
  from the process (``madvise``; the kernel's page cache keeps them, writes them back and frees them under
  pressure), so the process holds one batch's inputs and outputs. The file's space is reserved up front and
  its name removed once mapped (POSIX), so nothing stays on disk however the process ends. The results are those
  of the in-memory path with the same dtype.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator

import torch
from torch import nn

from recoup.errors import RecoupError
from recoup.model.anatomy import Anatomy, anatomy
from recoup.model.lazy import LazyWeights

Record = tuple[tuple, dict, bool]  # a layer's other positional args, keyword args, hidden states passed as keyword


class StopForward(Exception):
    """Raised by a capture hook to end a forward early."""


@contextlib.contextmanager
def hooked(*handles: Any) -> Iterator[None]:
    """Hold hook handles; remove them all on exit, whatever happens."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def call_layer(layer: nn.Module, h: torch.Tensor, rec: Record) -> torch.Tensor:
    """The output hidden states of decoder ``layer`` for inputs ``h`` (b, T, H) and its recorded arguments."""
    args, kwargs, as_kwarg = rec
    out = layer(*args, hidden_states=h, **kwargs) if as_kwarg else layer(h, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor inside (tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def _passthrough(*args: Any, **kwargs: Any) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def layers_passthrough(layers: nn.ModuleList) -> Iterator[None]:
    """Each layer's forward returns its hidden states unchanged (hooks still fire); restored on exit."""
    saved = [layer.__dict__.get("forward") for layer in layers]
    try:
        for layer in layers:
            layer.forward = _passthrough
        yield
    finally:
        for layer, fwd in zip(layers, saved):
            if fwd is None:
                del layer.forward
            else:
                layer.forward = fwd


@contextlib.contextmanager
def prefix_on(model: nn.Module, anat: Anatomy, device: torch.device) -> Iterator[None]:
    """Move every parameter and buffer outside the decoder layers, the final norm and lm_head (embeddings,
    positional / rotary embeddings: what runs before the first layer) to ``device``; move them back on exit.
    A tied weight (embedding = lm_head) moves once, as the one tensor it is."""
    skip = (anat.spec.layers, anat.spec.final_norm, anat.spec.lm_head)
    params: dict[int, tuple[nn.Parameter, torch.device]] = {}
    buffers: list[tuple[nn.Module, str, torch.device]] = []
    try:
        for name, mod in model.named_modules():
            if any(name == k or name.startswith(k + ".") for k in skip):
                continue
            for p in mod.parameters(recurse=False):
                if id(p) not in params:
                    params[id(p)] = (p, p.device)
                    p.data = p.data.to(device)
            for bname, b in list(mod._buffers.items()):
                if b is not None:
                    buffers.append((mod, bname, b.device))
                    mod._buffers[bname] = b.to(device)
        yield
    finally:
        for p, dev in params.values():
            p.data = p.data.to(dev)
        for mod, bname, dev in buffers:
            mod._buffers[bname] = mod._buffers[bname].to(dev)


def _prefix_params(model: nn.Module, anat: Anatomy) -> list[nn.Parameter]:
    """The parameters outside the decoder layers, the final norm and lm_head (what runs before the first layer);
    a tied one (embeddings = lm_head) once."""
    skip = (anat.spec.layers, anat.spec.final_norm, anat.spec.lm_head)
    out: dict[int, nn.Parameter] = {}
    for name, mod in model.named_modules():
        if not any(name == k or name.startswith(k + ".") for k in skip):
            out.update({id(p): p for p in mod.parameters(recurse=False)})
    return list(out.values())


def capture_inputs(
    model: nn.Module,
    anat: Anatomy,
    ids: torch.Tensor,
    batch_size: int,
    device: torch.device | None = None,
    passthrough: bool = False,
    store: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor | None, list[Record]]:
    """(first-layer inputs (N, T, H), per-layer (other args, kwargs, hidden-as-kwarg)) for ids (N, T).

    device: where the ids go (default: the model's first parameter's). passthrough: record the
    per-layer arguments with every layer replaced by a pass-through (offload: the layers need not
    be on ``device``), the arguments moved to ``device``. store: given, each batch's inputs go to
    ``store(first row, inputs)`` as they are computed instead of being joined (the inputs returned are None)."""
    layers = anat.layers
    device = device if device is not None else next(model.parameters()).device
    records: list[Any] = [None] * len(layers)

    def recorder(i: int):
        def hook(_mod, args, kwargs):
            as_kw = not args
            records[i] = (tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"}, as_kw)
            if passthrough and i == len(layers) - 1:
                raise StopForward

        return hook

    with hooked(*[layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]):
        if passthrough:
            with layers_passthrough(layers), contextlib.suppress(StopForward):
                model(input_ids=ids[:1].to(device), use_cache=False)
        else:
            model(input_ids=ids[:1].to(device), use_cache=False)
    if any(r is None for r in records):
        raise RecoupError("could not record the decoder layers' arguments (a layer was never called)")
    if passthrough:
        records = [to_device(r, device) for r in records]

    inps: list[torch.Tensor] = []
    row = [0]

    def grab(_mod, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).detach()
        if store is None:
            inps.append(h)
        else:
            store(row[0], h)
        raise StopForward

    with hooked(layers[0].register_forward_pre_hook(grab, with_kwargs=True)):
        for start in range(0, ids.shape[0], batch_size):
            row[0] = start
            try:
                model(input_ids=ids[start : start + batch_size].to(device), use_cache=False)
            except StopForward:
                pass
    return (torch.cat(inps, 0) if store is None else None), records


class LayerStreamer:
    """Walks the decoder layers of ``model`` one at a time over captured calibration inputs.

    device: the execution device (default: the model's). offload: each layer moves to ``device`` while it is
    worked on and back after (default: when ``device`` is not the model's device). weights: lazy weights
    (:mod:`recoup.model.lazy`; ``model`` is then a skeleton): the embeddings are read for the capture and
    freed, each layer is read from the checkpoint onto ``device`` when it is entered and freed when it is left,
    so memory holds one layer at a time. activation_dtype: the dtype the activations are stored in (default:
    the layers' own); budget_bytes: activations larger than this live in a memory-mapped temporary file (module
    docstring). ``peak_bytes`` counts the most activation memory the streamer held at once (the in-memory
    activations plus the batches it copied or produced; not a file's pages, nor what a caller's own loop over
    ``inps`` makes). Use::

        streamer = LayerStreamer(model, device=dev)
        streamer.capture(ids, batch_size)               # streamer.inps (N, T, H), streamer.records
        for i in range(streamer.num_layers):
            with streamer.layer(i) as layer:            # on the execution device
                ...                                     # observe / change the layer (hooks, streamer.run)
                streamer.propagate(i, batch_size)       # its outputs become the next layer's inputs
        streamer.close()                                # the activations (and their file) freed
    """

    def __init__(
        self,
        model: nn.Module,
        anat: Anatomy | None = None,
        device: torch.device | None = None,
        offload: bool | None = None,
        weights: LazyWeights | None = None,
        activation_dtype: torch.dtype | None = None,
        budget_bytes: int | None = None,
    ) -> None:
        self.model, self.weights = model, weights
        self.activation_dtype, self.budget_bytes = activation_dtype, budget_bytes
        self.compute_dtype: torch.dtype | None = None  # the first layer's input dtype, known after capture
        self.spilled = False  # whether the activations live (lived, once closed) in a memory-mapped file
        self.peak_bytes = 0
        self._folder: str | None = None
        self._map: mmap.mmap | None = None
        self.anat = anat if anat is not None else anatomy(model)
        self.model_device = torch.device("cpu") if weights is not None else next(model.parameters()).device
        if weights is not None:
            offload = True  # the layers live in the checkpoint: each is read onto the execution device in turn
        self.device = device if device is not None else self.model_device
        self.offload = self.device != self.model_device if offload is None else offload
        if not self.offload and self.device != self.model_device:
            raise RecoupError(
                f"offload=False needs the model on the execution device {self.device}; it is on {self.model_device}"
            )
        self.inps: torch.Tensor | None = None
        self.records: list[Record] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.anat.layers)

    @property
    def resident_bytes(self) -> int:
        """Bytes of the activations held in memory (0 when they live in a file)."""
        return 0 if self.inps is None or self.spilled else self.inps.numel() * self.inps.element_size()

    def _note(self, *batches: torch.Tensor) -> None:
        """Count the in-memory activations plus the given batches that are not views of them."""
        own = self.inps.untyped_storage().data_ptr() if self.inps is not None else None
        extra = sum(b.numel() * b.element_size() for b in batches if b.untyped_storage().data_ptr() != own)
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes + extra)

    def _mapped(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` backed by a new file in a temporary folder, its space reserved
        (a full disk is one line now, not a crash while writing), its name removed at once where the OS allows."""
        nbytes = math.prod(shape) * dtype.itemsize
        folder = tempfile.mkdtemp(prefix="recoup-activations-")
        path = os.path.join(folder, "activations.bin")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
            try:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, nbytes)
                else:
                    os.ftruncate(fd, nbytes)
                self._map = mmap.mmap(fd, nbytes)
            finally:
                os.close(fd)
        except OSError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise RecoupError(
                f"the calibration activations ({nbytes / 2**20:.0f} MiB) could not be placed in a file in "
                f"{os.path.dirname(folder)} ({exc.strerror or exc}); set TMPDIR to a folder with room, or raise "
                f"the activation budget"
            ) from None
        with contextlib.suppress(OSError):  # POSIX: the mapping outlives the name; Windows: removed by close()
            os.unlink(path)
            os.rmdir(folder)
        self._folder = folder if os.path.exists(folder) else None
        return torch.frombuffer(self._map, dtype=dtype).view(shape)

    def _release(self, rows: slice) -> None:
        """Drop the file's pages under ``rows`` from this process's memory once a batch is read or written: the
        file (and the kernel's page cache, which writes it back and can drop it) keeps the values, so the process
        holds what :attr:`peak_bytes` counts, not every page it touched. A shared file mapping never loses data
        this way, so whole pages around the rows go too."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        row = self.inps[0].numel() * self.inps.element_size()
        start = rows.start * row // mmap.PAGESIZE * mmap.PAGESIZE
        stop = min(-(-min(rows.stop, self.inps.shape[0]) * row // mmap.PAGESIZE) * mmap.PAGESIZE, len(self._map))
        if stop > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def _store(self, n: int) -> Callable[[int, torch.Tensor], None]:
        """The capture's sink: the first batch fixes the shape and dtypes and places the activations (in memory,
        or in a file when over the budget); every batch is written into its rows."""

        def store(start: int, h: torch.Tensor) -> None:
            if self.inps is None:
                self.compute_dtype = h.dtype
                dtype = self.activation_dtype or h.dtype
                shape = (n, *h.shape[1:])
                nbytes = math.prod(shape) * dtype.itemsize
                self.spilled = self.budget_bytes is not None and nbytes > self.budget_bytes
                if self.spilled:
                    self.inps = self._mapped(shape, dtype)
                else:
                    self.inps = torch.empty(shape, dtype=dtype, device=self.device)
            self._note(h)
            self.put(slice(start, start + h.shape[0]), h)

        return store

    def put(self, rows: slice, h: torch.Tensor) -> None:
        """Write ``h`` (the layers' dtype) into the activations' ``rows``, cast to their dtype; a value float16
        cannot hold is refused."""
        self.inps[rows] = h  # cast to the stored dtype (and copied to the host for a file)
        if self.inps.dtype == torch.float16 and h.dtype != torch.float16 and not torch.isfinite(self.inps[rows]).all():
            raise RecoupError(
                "an activation exceeds float16's range (65504); use --activation-dtype bfloat16 or float32"
            )
        self._release(rows)

    def load(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the activations on the execution device in the layers' dtype: a view where they
        already are so, else a copy."""
        x = self.inps[start:stop]
        if self.spilled:
            x = x.to(self.device, self.compute_dtype, copy=True)
            self._release(slice(start, stop))
            return x
        return x.to(self.device, self.compute_dtype)

    def close(self) -> None:
        """Free the activations (and remove their file's folder where it could not be removed at once)."""
        self.inps = None
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a tensor still viewing it: unmapped when that one is freed
                self._map.close()
            self._map = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def capture(self, ids: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, list[Record]]:
        """Capture the first layer's inputs for ids (N, T) in batches of ``batch_size`` and every layer's
        arguments; the inputs are written batch by batch into the activations (module docstring)."""
        self.close()
        if self.weights is not None:
            prefix = _prefix_params(self.model, self.anat)
            self.weights.load_params(prefix, self.device)
        try:
            with (
                torch.no_grad(),
                prefix_on(self.model, self.anat, self.device)
                if self.offload and self.weights is None
                else contextlib.nullcontext(),
            ):
                _, self.records = capture_inputs(
                    self.model,
                    self.anat,
                    ids,
                    batch_size,
                    self.device,
                    passthrough=self.offload,
                    store=self._store(ids.shape[0]),
                )
        except BaseException:
            self.close()
            raise
        finally:
            if self.weights is not None:
                self.weights.free_params(_prefix_params(self.model, self.anat))
        return self.inps, self.records

    @contextlib.contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        """Decoder layer ``i`` on the execution device for the duration of the block (offload: moved there and
        back, the CUDA cache emptied after)."""
        layer = self.anat.layers[i]
        if self.weights is not None:
            self.weights.load(layer, self.device)
        elif self.offload:
            layer.to(self.device)
        try:
            yield layer
        finally:
            if self.weights is not None:
                self.weights.free(layer)
            elif self.offload:
                layer.to(self.model_device)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def call(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Layer ``i``'s output for inputs ``h`` (b, T, H) with its recorded arguments (``h`` cast to the layers'
        dtype on the execution device first, where it is not already)."""
        if self.compute_dtype is not None:
            h = h.to(self.device, self.compute_dtype)
        return call_layer(self.anat.layers[i], h, self.records[i])

    def run(self, i: int, batch_size: int) -> None:
        """One forward of layer ``i`` over every calibration batch, outputs discarded (hooks observe it); a
        hook raising :class:`StopForward` ends that batch's forward."""
        for start in range(0, self.inps.shape[0], batch_size):
            x = self.load(start, start + batch_size)
            self._note(x)
            with contextlib.suppress(StopForward):
                self.call(i, x)

    def propagate(self, i: int, batch_size: int) -> None:
        """Replace the activations by layer ``i``'s outputs, batch by batch, in place."""
        for start in range(0, self.inps.shape[0], batch_size):
            x = self.load(start, start + batch_size)
            out = self.call(i, x)
            self._note(x, out)
            self.put(slice(start, start + batch_size), out)

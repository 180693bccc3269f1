"""The sequential compression engine: each decoder layer observed, compressed and propagated in turn.

The decoder layers are walked by :class:`recoup.model.streamer.LayerStreamer`, the one place that walks them
(also used by EoRA): it captures the first layer's inputs on the calibration windows and every layer's other
arguments, places each layer on the execution device (in place, or offloaded one layer at a time), and
propagates each layer's outputs to the next. What this module adds is the compression of one layer.

Per layer, per linear group in true-sequential order (attention before MLP): a pre-hook on the group's
first linear feeds one shared statistics object; the method compresses each linear of the group; the
layer's *compressed* outputs become the next layer's inputs (with a method's ``true_sequential`` off, as
the SparseGPT and Wanda reference code do, every group's statistics come from one forward of the dense layer
instead, and a second forward propagates). Otherwise each calibration batch's forward of the layer runs
once, parked at each group's hook until the group is compressed (:mod:`recoup.compress.onepass`: one
forward plus the statistics per layer, bitwise the result of re-running). A method that rescales an op
which already ran (AWQ), or a run whose parked forwards would exceed ``activation_budget_mb`` (default
half the device's free memory), re-runs the layer from its start for each group (stopping at the hook)
and once more to propagate.

Memory: the calibration activations (nsamples, seqlen, hidden) once, plus on the single-pass path the
parked forwards (estimated and logged), one group's statistics, no second copy of the model. Offloaded
(the execution device differs from the model's, e.g. ``device="cuda"`` for a model on CPU, or
``offload=True``), the device holds one layer + the activations + one group's statistics; the
activations stay on the execution device for the whole pass (float32: 4 * nsamples * seqlen * hidden bytes).
``activation_dtype`` bfloat16 or float16 stores them in 2 bytes a value (each layer's inputs rounded to it, the
layer still computing in its own dtype; :mod:`recoup.model.streamer`); activations larger than
``activation_budget_mb`` live in a memory-mapped temporary file on the host, whatever the execution device, each
batch copied to the device for its forward (bitwise the in-memory result; parked forwards, which would hold
every batch, are then off: they always need more than the activations).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from recoup.artifact.report import CompressReport, LinearRecord, peak_rss_mb, rss_mb
from recoup.blocks import zero_fraction
from recoup.compress.config import CompressConfig
from recoup.compress.devices import resolve_device
from recoup.compress.methods import METHODS, LinearResult
from recoup.compress.onepass import available_bytes, parked_bytes, run_parked
from recoup.compress.parallel import side_by_side
from recoup.compress.stats import ActNormStats, ActSampleStats, BlockIOStats, HessianStats, relative_error
from recoup.data.calibration import Calibration
from recoup.errors import RecoupError
from recoup.model.anatomy import Anatomy, _get, anatomy
from recoup.model.lazy import LazyWeights
from recoup.model.load import LoadedModel
from recoup.model.streamer import LayerStreamer, StopForward, hooked

log = logging.getLogger(__name__)


class LayerView:
    """One decoder layer as the methods see it: weights as (out, in) float32 whatever the storage."""

    def __init__(self, layer: nn.Module, anat: Anatomy, linear_names: tuple[str, ...]) -> None:
        self.layer, self.anat, self.linear_names = layer, anat, linear_names
        self.model_type = anat.model_type
        self.results: dict[str, LinearResult] = {}

    def module(self, name: str) -> nn.Module:
        return _get(self.layer, name)

    def get_weight(self, name: str, copy: bool = True) -> torch.Tensor:
        """The weight (out, in) float32; ``copy=False``: the layer's own tensor where it already is one (a method
        reads its input and returns a new weight, so the engine needs no float32 copy of each matrix; the layer's
        tensor is overwritten only once the result is recorded)."""
        w = self.anat.weight_matrix(self.module(name)).detach().float().contiguous()
        return w.clone() if copy else w

    def set_weight(self, name: str, w: torch.Tensor) -> None:
        p = self.module(name).weight
        p.data.copy_((w.t() if self.anat.spec.conv1d else w).to(p.dtype))


def _targets(anat: Anatomy, which: str) -> list[tuple[str, ...]]:
    spec = anat.spec
    allowed = {"all": spec.attention + spec.mlp, "attention": spec.attention, "mlp": spec.mlp}[which]
    groups = [tuple(n for n in g if n in allowed) for g in anat.spec.sequential]
    return [g for g in groups if g]


def _validate_shapes(anat: Anatomy, groups: list[tuple[str, ...]], config: CompressConfig) -> None:
    for i, layer in enumerate(anat.layers):
        for name in (n for g in groups for n in g):
            rows, cols = anat.weight_matrix(_get(layer, name)).shape
            if config.group_size and config.group_size > cols:
                raise RecoupError(
                    f"group size {config.group_size} is larger than the input size {cols} of "
                    f"layer {i} {name}; use a group size <= {cols} or -1 (one group per row)"
                )
            if config.nm and cols % config.nm[1]:
                raise RecoupError(
                    f"{config.pattern} needs input sizes divisible by {config.nm[1]}; layer {i} {name} has {cols}"
                )


# calibration windows per forward on the one-forward path by default: each batch there is a parked forward in its
# own thread with its own pool of torch worker threads, so fewer, larger batches take less time and memory than
# one window per forward. Where a layer runs straight through the default is 1.
PARKED_BATCH = 8


def _new_stats(
    kind: str, cols: int, config: CompressConfig, calls: int, device: torch.device, parent: nn.Module | None = None
):
    if kind == "hessian":
        return HessianStats(cols, device)
    if kind == "act_norm":
        return ActNormStats(cols, device)
    if kind == "act_sample":
        return ActSampleStats(cols, config.options.samples, calls, device)
    if kind == "block_io":
        return BlockIOStats(
            cols,
            config.options.samples,
            calls,
            device,
            parent,
            config.options.block_tokens,
            hessian=config.options.rounding == "gptq",
        )
    return None


def _observe(streamer: LayerStreamer, i: int, firsts: list[nn.Module], stats: list, batch_size: int) -> None:
    """Feed ``stats[k]`` the inputs of ``firsts[k]`` (and, for block_io statistics, the calls of their parent
    block, hooked first so it fires first) over every calibration batch of one forward of layer ``i``, stopping
    at the last of them. One group: its statistics on the layer as it now is; every group of a still-dense
    layer: the order of the SparseGPT and Wanda reference code (``true_sequential`` off)."""

    def adder(k: int):
        def hook(_mod, args):
            stats[k].add(args[0].detach())
            if k == len(firsts) - 1:
                raise StopForward

        return hook

    def recorder(k: int):
        def hook(_mod, args, kwargs):
            stats[k].add_call(args, kwargs)

        return hook

    handles = [
        s.parent.register_forward_pre_hook(recorder(k), with_kwargs=True)
        for k, s in enumerate(stats)
        if getattr(s, "parent", None) is not None
    ]
    handles += [first.register_forward_pre_hook(adder(k)) for k, first in enumerate(firsts)]
    with hooked(*handles):
        streamer.run(i, batch_size)


def _dense_order(config: CompressConfig) -> bool:
    """Whether every group takes its statistics from the dense layer (a method's ``true_sequential`` off)."""
    return not getattr(config.options, "true_sequential", True)


def _compress_groups(
    i: int,
    view: LayerView,
    method,
    pairs: list[tuple[tuple[str, ...], Any]],
    config: CompressConfig,
    linears: list[LinearRecord],
) -> None:
    """Compress the groups ``pairs`` of layer ``i``: each is (the linears' names, their shared statistics),
    in order. A method whose per-linear math runs on one thread (``Method.one_thread``) compresses all of
    them side by side, one per torch thread (:mod:`recoup.compress.parallel`: bitwise the same weights);
    otherwise one after the other (AWQ's ``prepare_group`` rescales a group before it is compressed)."""
    jobs = [(names, stats, name) for names, stats in pairs for name in names]
    w0s = (
        [view.get_weight(name, copy=False) for _, _, name in jobs]
        if method.one_thread and not method.prepare_group
        else []
    )
    # tied weights (one storage) stay one at a time: each must see the one before it compressed
    if w0s and len({w.untyped_storage().data_ptr() for w in w0s}) == len(w0s):
        for _, stats in pairs:
            getattr(stats, "xtx", None)  # a blocked Hessian mirrors its triangle once, before the threads read it

        def one(k: int) -> tuple[LinearResult, float, str, float]:
            t0 = time.time()
            res = method.compress_linear(w0s[k], jobs[k][1], config)
            return (res, *relative_error(w0s[k], res.weight, jobs[k][1]), time.time() - t0)

        # waves of as many linears as threads, the largest first: the results in memory at once are one wave's,
        # not the whole layer's (an 8B layer's seven results with GPTQ's copies were 5 GB); recorded as each wave
        # ends, then listed in the layer's order
        workers, first = torch.get_num_threads(), len(linears)
        order = sorted(range(len(jobs)), key=lambda k: -w0s[k].numel())
        for at in range(0, len(order), workers):
            wave = order[at : at + workers]
            done = side_by_side(one, wave, [w0s[k].numel() for k in wave], workers)
            for k, (res, err, kind, seconds) in zip(wave, done):
                _record(i, view, jobs[k][2], w0s[k], res, err, kind, seconds, {}, config, linears)
            del done, res
        rank = {f"{view.anat.spec.layers}.{i}.{name}": k for k, (_, _, name) in enumerate(jobs)}
        linears[first:] = sorted(linears[first:], key=lambda r: rank[r.name])
        return
    for names, stats in pairs:
        group_info = method.prepare_group(view, names, stats, config) if method.prepare_group else {}
        for name in names:
            t0 = time.time()
            w0 = view.get_weight(name, copy=False)
            res = method.compress_linear(w0, stats, config)
            err, kind = relative_error(w0, res.weight, stats)
            _record(i, view, name, w0, res, err, kind, time.time() - t0, group_info, config, linears)
            del w0, res  # before the next linear's copies: the layer's peak is one linear's work, not two


def _record(
    i: int,
    view: LayerView,
    name: str,
    w0: torch.Tensor,
    res: LinearResult,
    err: float,
    kind: str,
    seconds: float,
    group_info: dict,
    config: CompressConfig,
    linears: list[LinearRecord],
) -> None:
    """Put the compressed weight in the layer and what was done in the report."""
    view.set_weight(name, res.weight)
    # the layer holds the weight now; the grid (scale, zero, g_idx) is all that is read later (the artifact's
    # qparams, AWQ's folding), so the result's float32 weight and mask copies go (a layer's worth of memory)
    view.results[name] = dataclasses.replace(res, weight=torch.empty(0), mask=None)
    linears.append(
        LinearRecord(
            name=f"{view.anat.spec.layers}.{i}.{name}",
            layer=i,
            shape=tuple(w0.shape),
            sparsity=zero_fraction(res.weight),
            bits=config.bits,
            group_size=config.group_size,
            error=err,
            error_kind=kind,
            seconds=seconds,
            info={**group_info, **res.info},
        )
    )


def single_pass(
    method,
    config: CompressConfig,
    inps: torch.Tensor,
    group_cols: list[int],
    device: torch.device,
    element_size: int | None = None,
    spilled: bool = False,
) -> tuple[bool, int]:
    """(whether layers run once per batch, the parked forwards' estimated bytes) for this method and budget.

    A method that rescales the op before a group (AWQ's ``prepare_group``) changes what an already-run
    part of the forward computed, so it re-runs, as do activations that live in a file (``spilled``: the
    parked forwards would hold every batch in memory); otherwise the budget (``activation_budget_mb``, default
    half the device's free memory) decides. element_size: bytes of a value as the layers compute (default
    the activations')."""
    size = element_size if element_size is not None else inps.element_size()
    need = parked_bytes(inps.shape[0] * inps.shape[1], inps.shape[2], group_cols, size)
    if method.prepare_group is not None or spilled:
        return False, need
    budget = (
        config.activation_budget_mb * 2**20 if config.activation_budget_mb is not None else available_bytes(device) // 2
    )
    return need <= budget, need


def _compress_layer(
    i: int,
    streamer: LayerStreamer,
    method,
    groups: list[tuple[str, ...]],
    config: CompressConfig,
    calls: int,
    linears: list[LinearRecord],
    qparams: dict[str, dict[str, torch.Tensor]],
    once: bool,
    propagate: bool = True,
) -> None:
    """Observe, compress and propagate decoder layer ``i`` of the streamer's model (on the execution device,
    where the streamer's activations ``inps`` are; None for a method without calibration data).

    ``propagate`` off (the last layer: nothing reads its output): the forwards stop at the last group's
    statistics and ``inps`` is left as it was.

    A method option ``true_sequential`` that is off: every group's statistics from one forward of the dense
    layer, then the groups compressed in order and the layer run once more to propagate. Otherwise, once:
    one forward per calibration batch, parked at each group (:mod:`recoup.compress.onepass`); not once: the
    layer re-runs from its start for each group's statistics and once more to propagate."""
    anat, layer, inps, device = streamer.anat, streamer.anat.layers[i], streamer.inps, streamer.device
    view = LayerView(layer, anat, tuple(n for g in groups for n in g))

    def stats_for(names: tuple[str, ...]):
        block = method.block(view.model_type, names) if method.block else None
        return _new_stats(
            method.stats,
            view.get_weight(names[0], copy=False).shape[1],
            config,
            calls,
            device,
            view.module(block) if block else None,
        )

    if inps is not None and _dense_order(config):
        stats = [stats_for(names) for names in groups]
        _observe(streamer, i, [view.module(g[0]) for g in groups], stats, config.batch_size)
        _compress_groups(i, view, method, list(zip(groups, stats)), config, linears)
        del stats
        if propagate:
            streamer.propagate(i, config.batch_size)
    elif inps is not None and once:
        run_parked(
            lambda h: streamer.call(i, h),
            [view.module(g[0]) for g in groups],
            inps,
            config.batch_size,
            lambda k: stats_for(groups[k]),
            lambda k, stats: _compress_groups(i, view, method, [(groups[k], stats)], config, linears),
            device,
            finish=propagate,
            store=streamer.put,
        )
    else:
        for names in groups:
            stats = None
            if inps is not None:
                stats = stats_for(names)
                _observe(streamer, i, [view.module(names[0])], [stats], config.batch_size)
            _compress_groups(i, view, method, [(names, stats)], config, linears)
            del stats
        if inps is not None and propagate:
            streamer.propagate(i, config.batch_size)
    for name, res in view.results.items():
        if res.scale is not None:
            qparams[f"{anat.spec.layers}.{i}.{name}"] = {
                "scale": res.scale.cpu(),
                "zero": res.zero.cpu(),
                "g_idx": res.g_idx.cpu(),
            }


@torch.no_grad()
def compress(
    loaded: LoadedModel,
    config: CompressConfig,
    calibration: Calibration | None = None,
    *,
    device: str | torch.device | None = None,
    offload: bool | None = None,
    weights: LazyWeights | None = None,
    on_layer: Callable[[int, nn.Module, list[str], dict], None] | None = None,
) -> CompressReport:
    """Compress ``loaded.model`` in place with ``config`` (one sequential pass) and report what was done.

    calibration: windows (nsamples, seqlen) from :func:`recoup.data.calibration.calibration_windows`;
    required by wanda, sparsegpt, gptq and awq, unused by magnitude and rtn.
    device: the execution device (None: the model's; "auto": cuda when available, else cpu).
    offload: move one decoder layer at a time to ``device`` and back, the model staying where it is
    (default: when ``device`` differs from the model's device). The weights are the model's either way.
    weights: lazy weights (``loaded.model`` is a skeleton, :mod:`recoup.model.lazy`): each decoder layer is read
    from the checkpoint when reached and freed after; ``on_layer(i, layer, names, qparams)`` is then called with
    the compressed layer still in memory (``names``: its linears as the report lists them), e.g. to write it;
    it may take the layer's grids out of ``qparams`` (the report then holds only the grids left in it).
    """
    model = loaded.model
    anat = anatomy(model)
    method = METHODS.get(config.method)
    groups = _targets(anat, config.targets)
    _validate_shapes(anat, groups, config)
    needs_data = method.stats != "none"
    if needs_data and calibration is None:
        raise RecoupError(f"{config.method} needs calibration data (e.g. --calib ptb)")
    model_device = torch.device("cpu") if weights is not None else next(model.parameters()).device
    device = resolve_device(device, model_device)
    budget = config.activation_budget_mb * 2**20 if config.activation_budget_mb is not None else None
    act_dtype = None if config.activation_dtype == "auto" else getattr(torch, config.activation_dtype)
    streamer = LayerStreamer(model, anat, device, offload, weights, activation_dtype=act_dtype, budget_bytes=budget)
    offload = streamer.offload
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    log.info(
        "compress %s: %s",
        config.describe(),
        f"offload, model on {model_device}, one layer at a time on {device}" if offload else f"in place on {device}",
    )
    started = time.time()
    was_training = model.training
    model.eval()
    calls, once = 0, False
    linears: list[LinearRecord] = []
    qparams: dict[str, dict[str, torch.Tensor]] = {}
    try:
        if needs_data:
            ids = calibration.input_ids
            inps, _ = streamer.capture(ids, config.batch_size or 1)
            cols = [anat.weight_matrix(_get(anat.layers[0], g[0])).shape[1] for g in groups]
            once, need = single_pass(
                method, config, inps, cols, device, streamer.compute_dtype.itemsize, streamer.spilled
            )
            if config.batch_size is None:
                config = copy.copy(config)  # the report records the batch size used
                config.batch_size = PARKED_BATCH if once and not _dense_order(config) else 1
            calls = -(-ids.shape[0] // config.batch_size)
            why = (
                "the method rescales earlier ops"
                if method.prepare_group
                else f"parked forwards would need {need / 2**20:.0f} MiB, over the budget"
            )
            log.info(
                "captured layer inputs %s %s %s in %.1fs (%.0f MiB); %s",
                tuple(inps.shape),
                str(inps.dtype).removeprefix("torch."),
                "in a memory-mapped temporary file" if streamer.spilled else f"on {inps.device}",
                time.time() - started,
                inps.numel() * inps.element_size() / 2**20,
                "every group's statistics from the dense layer, then one forward to propagate (true_sequential off)"
                if _dense_order(config)
                else f"one forward per layer, parked forwards <= {need / 2**20:.0f} MiB"
                if once
                else f"re-running each layer per group ({why})",
            )
            del inps
        for i in tqdm(range(streamer.num_layers), desc=f"compress {config.describe()}", unit="layer"):
            t_layer = time.time()
            first_record = len(linears)
            with streamer.layer(i) as layer:
                _compress_layer(
                    i,
                    streamer,
                    method,
                    groups,
                    config,
                    calls,
                    linears,
                    qparams,
                    once,
                    propagate=i < streamer.num_layers - 1,
                )
                if on_layer is not None:
                    on_layer(i, layer, [r.name for r in linears[first_record:]], qparams)
            errs = [r.error for r in linears[first_record:]]
            now = rss_mb()  # after the layer is freed: with lazy weights this should not grow from layer to layer
            log.info(
                "layer %d: %.1fs, mean relative error %.4g (max %.4g), RSS %s MiB (peak %.0f)",
                i,
                time.time() - t_layer,
                sum(errs) / len(errs),
                max(errs),
                "?" if now is None else f"{now:.0f}",
                peak_rss_mb(),
            )
        # how the activations were held: the dtype (a narrower one rounds each layer's inputs) and where
        activations = (
            {
                "activation_dtype": str(streamer.inps.dtype).removeprefix("torch."),
                "activation_storage": "file" if streamer.spilled else "memory",
            }
            if streamer.inps is not None
            else {}
        )
    finally:
        streamer.close()
        model.train(was_training)
    report = CompressReport(
        method=config.method,
        config=config.to_dict(),
        model_type=anat.model_type,
        calibration={**calibration.protocol, **activations} if calibration is not None else None,
        linears=linears,
        seconds=time.time() - started,
        peak_rss_mb=peak_rss_mb(),
        qparams=qparams,
    )
    log.info(
        "compressed %d linears (%s) in %.1fs: sparsity %.4f, peak RSS %.0f MiB",
        len(linears),
        config.describe(),
        report.seconds,
        report.sparsity,
        report.peak_rss_mb,
    )
    if cuda:
        log.info("peak %s memory allocated: %.0f MiB", device, torch.cuda.max_memory_allocated(device) / 2**20)
    return report

"""Block-wise reconstruction: fit each decoder layer's trainable parameters to reproduce the dense layer's output,
one layer at a time, before end-to-end training (``recoup recover ART --method tune --blockwise-steps N``).

Design (EfficientQAT's Block-AP, Chen et al. 2024; the sequential order of GPTQ / SparseGPT):

- two streams of activations over the same calibration windows, each (nsamples, seqlen, hidden), walked by the
  project's one layer streamer (:class:`recoup.model.streamer.LayerStreamer`): the *teacher* stream through the
  dense model's layers, the *student* stream through the compressed model's own layers;
- for layer ``i``: the target is the dense layer's output on the teacher stream; the student layer's input is the
  student stream, the compressed model's own activations, so each layer corrects the error accumulated before it
  (not just its own);
- loss: ``||y_s - y_t||^2 / ||y_t||^2`` over the windows of a batch, the MSE normalised by the teacher output's
  mean square (SquareHead's normalisation, :func:`recoup.recover.losses.squarehead_loss` on one layer);
- the layer's trainable parameters (what ``--trainable`` chose inside it: its scale ratios, its norms' gains, its
  masked kept weights; the final norm belongs to no layer and trains end to end only) train for ``steps`` steps
  in the one training loop (:func:`recoup.recover.train.train`: AdamW, warm-up and decay, clipping), on seeded
  batches of windows; everything else is frozen. The loss over every window is measured before and after; a
  layer whose loss did not fall keeps its parameters as they were (the best state, as the loop keeps its best);
- then the student stream moves through the tuned layer and the teacher stream through the dense layer.

Memory is bounded as in compression: one layer trains at a time and only the two activation buffers (each
nsamples x seqlen x hidden, overwritten in place) grow with the calibration set, nothing with depth; the teacher
layer's outputs are computed once per layer into the teacher buffer, which is the next layer's teacher input.
"""

from __future__ import annotations

import logging
import time
from typing import Iterator

import torch
from torch import nn

from recoup.model.streamer import LayerStreamer
from recoup.recover.losses import squarehead_loss
from recoup.recover.train import TrainConfig, train

log = logging.getLogger(__name__)


def layer_params(layer: nn.Module, params: list[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters of ``params`` that live inside ``layer`` (a parametrization's included), in ``params`` order."""
    own = {id(p) for p in layer.parameters()}
    return [p for p in params if id(p) in own]


def index_batches(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of window indices into ``n`` windows: a seeded permutation per epoch, cut into batches of
    ``min(batch_size, n)`` (an epoch's remainder is dropped)."""
    gen = torch.Generator().manual_seed(seed)
    b = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n - b + 1, b):
            yield perm[start : start + b]


@torch.no_grad()
def set_loss(student: LayerStreamer, i: int, target: torch.Tensor, batch_size: int) -> float:
    """Layer ``i``'s normalised MSE over every window: ``sum ||y_s - y_t||^2 / sum ||y_t||^2``, the student layer on
    the student stream, ``target`` (N, T, H) the dense layer's outputs."""
    err = ref = 0.0
    for start in range(0, target.shape[0], batch_size):
        y = student.call(i, student.inps[start : start + batch_size]).float()
        t = target[start : start + batch_size].float()
        err += float((y - t).pow(2).sum())
        ref += float(t.pow(2).sum())
    return err / max(ref, torch.finfo(torch.float32).tiny)


def blockwise_reconstruct(
    student: nn.Module,
    teacher: nn.Module,
    ids: torch.Tensor,
    params: list[nn.Parameter],
    steps: int,
    train_config: dict,
    batch_size: int,
) -> dict:
    """Fit, layer by layer, the parameters of ``params`` inside each decoder layer of ``student`` (in place) to the
    outputs of ``teacher``'s layer; ``ids`` (N, T) the calibration windows; ``train_config`` the
    :class:`~recoup.recover.train.TrainConfig` keys shared with the end-to-end loop (lr, warmup, max_grad_norm,
    weight_decay, seed). Returns the record: steps, seconds and per layer its trained parameters and loss before /
    after."""
    started = time.time()
    s_stream, t_stream = LayerStreamer(student, offload=False), LayerStreamer(teacher, offload=False)
    s_stream.capture(ids, batch_size)
    t_stream.capture(ids.to(next(teacher.parameters()).device), batch_size)
    t_stream.inps = t_stream.inps.to(s_stream.inps.device)
    seed = int(train_config.get("seed", 0))
    layers = []
    for i in range(s_stream.num_layers):
        with s_stream.layer(i) as layer, t_stream.layer(i):
            with torch.no_grad():
                t_stream.propagate(i, batch_size)  # teacher buffer := the dense layer's outputs, the targets
            target = t_stream.inps
            own = layer_params(layer, params)
            before = set_loss(s_stream, i, target, batch_size)
            after, kept = before, True
            if own and steps > 0:
                saved = [p.detach().clone() for p in own]

                def loss_fn(idx: torch.Tensor, i: int = i) -> torch.Tensor:
                    idx = idx.to(target.device)
                    return squarehead_loss([s_stream.call(i, s_stream.inps[idx])], [target[idx]])

                cfg = TrainConfig(**{**train_config, "steps": steps, "eval_every": steps, "seed": seed + i})
                train(own, index_batches(ids.shape[0], batch_size, seed + i), loss_fn, cfg, desc=f"blockwise {i}")
                after = set_loss(s_stream, i, target, batch_size)
                if not after < before:  # the best state: the layer as it was
                    with torch.no_grad():
                        for p, s in zip(own, saved):
                            p.copy_(s)
                    after, kept = before, False
            with torch.no_grad():
                s_stream.propagate(i, batch_size)  # student buffer := the tuned layer's outputs
        log.info(
            "blockwise layer %d/%d: loss %.4g -> %.4g (%d parameters%s)",
            i + 1,
            s_stream.num_layers,
            before,
            after,
            sum(p.numel() for p in own),
            "" if kept else ", not improved: left as it was",
        )
        layers.append(
            {
                "layer": i,
                "parameters": int(sum(p.numel() for p in own)),
                "loss_before": before,
                "loss_after": after,
                "improved": kept and after < before,
            }
        )
    return {
        "steps": steps,
        "windows": int(ids.shape[0]),
        "seqlen": int(ids.shape[1]),
        "batch_size": min(batch_size, int(ids.shape[0])),
        "loss": "||y_s - y_t||^2 / ||y_t||^2 per layer (student stream in, dense layer's output on the dense stream)",
        "layers": layers,
        "seconds": round(time.time() - started, 1),
    }


def reconstruct(loaded, config, teacher: nn.Module | None, params: list[nn.Parameter], cal: dict) -> dict:
    """Block-wise reconstruction of ``params`` inside the artifact ``loaded`` for a tune ``config`` (its
    ``blockwise_steps``, ``batch_size``, ``teacher`` and loop keys) on the compression's calibration windows
    (``cal``, the manifest's record) against the dense source: ``teacher`` (the objective's) or, when None, loaded
    for this and freed after. Returns the tuning record's ``blockwise`` entry."""
    from recoup.data.calibration import calibration_windows
    from recoup.recover.train import load_teacher, teacher_source

    calib = calibration_windows(
        loaded.tokenizer,
        cal["corpus"],
        int(cal["nsamples"]),
        int(cal["seqlen"]),
        int(cal.get("seed") or 0),
        cal.get("split") or "train",
        cal.get("bos") or "auto",
    )
    if teacher is None:
        param = next(loaded.model.parameters())
        teacher = load_teacher(loaded, config.teacher, dtype=param.dtype, device=str(param.device)).model.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    keys = ("lr", "warmup", "max_grad_norm", "weight_decay", "seed")
    rec = blockwise_reconstruct(
        loaded.model,
        teacher,
        calib.input_ids,
        params,
        config.blockwise_steps,
        {k: getattr(config, k) for k in keys},
        config.batch_size,
    )
    return {
        **rec,
        "teacher": teacher_source(loaded, config.teacher),
        "calibration": calib.protocol,
        "lr": config.lr,
    }

"""The one training loop every recovery method uses.

AdamW, linear warm-up then linear decay, gradient clipping, a seeded order, periodic validation,
the best state (lowest validation loss) kept, a progress bar showing loss and validation
perplexity. The caller supplies the trainable parameters, a batch iterator and a loss function.

Data parallel under ``torchrun`` / ``accelerate launch`` (:mod:`recoup.model.parallel`), for every method at
once: rank 0's initial parameters are broadcast, each rank's batches are its slice of the global batch
(:meth:`recoup.recover.task_data.TuningData.batches`), gradients are averaged over the ranks before clipping
(as DDP does: exact for equal scored tokens per slice, e.g. corpus windows), the logged loss is the ranks'
mean, and rank 0 alone validates, keeps the best state and shows progress (only its result is saved).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from typing import Callable, ClassVar, Iterator

import torch
from tqdm.auto import tqdm

from recoup.config import Config, check
from recoup.data.bos import check_policy
from recoup.errors import RecoupError
from recoup.model import parallel

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainConfig(Config):
    steps: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of steps
    max_grad_norm: float = 1.0
    eval_every: int = 50
    seed: int = 0
    time_budget_s: float | None = None  # stop early (keeping the best state) once spent

    def __post_init__(self) -> None:
        check(self.steps >= 1, f"steps must be >= 1 (got {self.steps})")
        check(0 < self.lr < 1, f"lr must be in (0, 1) (got {self.lr})")
        check(0 <= self.warmup < 1, f"warmup is a fraction of steps in [0, 1) (got {self.warmup})")
        check(self.eval_every >= 1, f"eval_every must be >= 1 (got {self.eval_every})")


@dataclasses.dataclass
class FitConfig(Config):
    """The keys every trained recovery shares: what it trains on and the loop (defaults: the prompt methods').

    Training data is exactly one of ``data`` (a corpus: ptb, wiki, a .txt/.jsonl file or a comma-separated
    mix; next-token loss on ``seqlen``-token windows at seeded offsets) or ``task`` (a multiple-choice task's
    train part of a seeded hash split; loss on the gold continuation; ``heldout_fraction`` stays unseen).
    ``default_data`` is what a method trains on when given neither (None: it must be told).
    """

    data: str | None = None
    task: str | None = None
    heldout_fraction: float | None = None  # task only: the share kept out (default 0.3)
    seqlen: int = 256  # corpus: window length; task/jsonl: max tokens per example (context cut from the left)
    batch_size: int = 2
    steps: int = 80
    lr: float = 3e-2
    warmup: float = 0.05
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    eval_every: int | None = 15  # None: every steps // 5
    val_windows: int | None = None  # corpus: valid-split windows per validation (default 4); not with a task
    seed: int = 0  # initialisation, batch order and the task split
    time_budget: float | None = None  # seconds; stop early (best state kept) once spent
    bos: str = "auto"  # BOS policy of every training window / sequence (recoup.data.bos): auto | always | never
    gradient_checkpointing: bool = False  # recompute decoder layers in the backward: less memory, one more forward
    objective: str = "lm"  # lm (next-token loss) | kd (teacher's next tokens) | squarehead (teacher's layer
    # outputs, Kurtic et al. 2023) | a + sum of them: lm+kd, kd+squarehead, lm+squarehead, lm+kd+squarehead
    kd_temperature: float = 2.0
    kd_weight: float = 1.0  # lm+kd: weight of the kd term
    squarehead_weight: float = 1.0  # squarehead beside another term: its weight
    teacher: str | None = None  # kd: the teacher model (default: the artifact's recorded dense source)

    default_data: ClassVar[str | None] = "ptb"

    def __post_init__(self) -> None:
        check_policy(self.bos)
        check(self.seqlen >= 2, f"seqlen must be >= 2 (got {self.seqlen})")
        check(self.batch_size >= 1, f"batch_size must be >= 1 (got {self.batch_size})")
        check(self.task is None or self.data is None, "give a task (--task T) or data (--data SRC), not both")
        if self.task is not None:
            check(bool(self.task.strip()), "task is empty; name a multiple-choice task (sciq, arc_easy ...)")
            self.heldout_fraction = 0.3 if self.heldout_fraction is None else self.heldout_fraction
            check(0 < self.heldout_fraction < 1, f"heldout_fraction must be in (0, 1) (got {self.heldout_fraction})")
            check(
                self.val_windows is None,
                "val_windows applies to corpus training; with a task, validation is "
                "the seeded 64-example slice of the task's train part",
            )
        else:
            check(self.heldout_fraction is None, "heldout_fraction applies only with a task (--task T)")
            self.data = self.default_data if self.data is None else self.data
            check(
                self.data is not None,
                "this method needs training data: --task T (e.g. sciq) or --data SRC "
                "(a corpus such as ptb, or a .txt/.jsonl file)",
            )
            check(bool(str(self.data).strip()), "data is empty; name a corpus (ptb, wiki) or a text file")
            self.val_windows = 4 if self.val_windows is None else self.val_windows
            check(self.val_windows >= 1, f"val_windows must be >= 1 (got {self.val_windows})")
        check(
            self.time_budget is None or self.time_budget > 0,
            f"time_budget must be > 0 seconds (got {self.time_budget})",
        )
        from recoup.recover.losses import objective_terms

        objective_terms(self.objective)  # one line naming the objectives for anything else
        check(self.squarehead_weight >= 0, f"squarehead_weight must be >= 0 (got {self.squarehead_weight})")
        check(self.kd_temperature > 0, f"kd_temperature must be > 0 (got {self.kd_temperature})")
        check(self.kd_weight >= 0, f"kd_weight must be >= 0 (got {self.kd_weight})")
        self.train_config()  # validates steps, lr, warmup, eval_every

    def objective_loss(self, loaded):
        """The :class:`~recoup.recover.losses.Objective` of this config for ``loaded`` (the student): for kd,
        the teacher (``teacher`` or the artifact's dense source) is loaded once, frozen, in the student's
        dtype and on its device."""
        from recoup.recover.losses import Objective

        if self.objective == "lm":
            return Objective("lm")
        param = next(loaded.model.parameters())
        teacher = load_teacher(loaded, self.teacher, dtype=param.dtype, device=str(param.device)).model
        for p in teacher.parameters():
            p.requires_grad_(False)
        return Objective(self.objective, teacher.eval(), self.kd_temperature, self.kd_weight, self.squarehead_weight)

    def train_config(self) -> "TrainConfig":
        every = self.eval_every if self.eval_every is not None else max(1, self.steps // 5)
        return TrainConfig(
            steps=self.steps,
            lr=self.lr,
            weight_decay=self.weight_decay,
            warmup=self.warmup,
            max_grad_norm=self.max_grad_norm,
            eval_every=every,
            seed=self.seed,
            time_budget_s=self.time_budget,
        )


def teacher_source(loaded, teacher: str | None) -> str:
    """The dense model a compressed ``loaded`` came from: ``teacher`` or the manifest's recorded source."""
    if teacher:
        return teacher
    src = (loaded.manifest or {}).get("source") or {}
    if not src:
        raise RecoupError(
            f"'{loaded.source}' is not a compressed artifact (no manifest source); give the dense "
            f"model with --teacher SOURCE"
        )
    return str(src.get("path") or src.get("model"))


def load_teacher(loaded, teacher: str | None, dtype: str | torch.dtype = "float32", device: str = "cpu"):
    """Load the dense source of ``loaded`` (or ``teacher``); one clear line when it cannot be loaded."""
    from recoup.artifact import load_model

    src = teacher_source(loaded, teacher)
    try:
        return load_model(src, dtype=dtype, device=device)
    except (RecoupError, OSError, ValueError) as exc:
        raise RecoupError(
            f"cannot load the dense source '{src}' of '{loaded.source}' ({exc}); give it with --teacher SOURCE"
        ) from None


@dataclasses.dataclass
class TrainResult:
    steps: int
    seconds: float
    train_loss: list[float]
    val_loss: list[tuple[int, float]]
    best_val_loss: float | None
    best_step: int | None
    tokens: int
    cpu_seconds: float | None = None  # process CPU time (all threads) spent in the loop

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    warm = max(1, int(cfg.warmup * cfg.steps))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))

    return f


@contextlib.contextmanager
def training_context(model: torch.nn.Module, gradient_checkpointing: bool = False):
    """Memory and precision for training a recovery on ``model`` (its weights frozen), for every method at once.

    - ``gradient_checkpointing``: the decoder layers recompute their activations in the backward pass
      (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"); only the layers themselves are
      put in training mode, so no dropout turns on; off again on exit.
    - a bfloat16/float16 model runs its forward under ``torch.autocast`` in its own dtype, while the trainable
      parameters and the optimizer state stay float32 (:func:`train` keeps them so): mixed precision
      (Micikevicius et al. 2018).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    hooks = []
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            from recoup.errors import RecoupError

            raise RecoupError(f"{type(model).__name__} does not support gradient checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        def on(module, args):  # transformers checkpoints a layer only in training mode: the layer alone, for
            module.training = True  # its own call (children, e.g. dropout, stay as they are: eval)

        def off(module, args, output):
            module.training = False

        for m in model.modules():
            if isinstance(m, GradientCheckpointingLayer):
                hooks += [m.register_forward_pre_hook(on), m.register_forward_hook(off)]
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    amp = (
        torch.autocast(device_type=device.type, dtype=dtype)
        if dtype in (torch.bfloat16, torch.float16)
        else contextlib.nullcontext()
    )
    try:
        with amp:
            yield
    finally:
        for h in hooks:
            h.remove()
        if gradient_checkpointing:
            model.gradient_checkpointing_disable()


def train(
    params: list[torch.nn.Parameter],
    batches: Iterator,
    loss_fn: Callable[[object], torch.Tensor],
    cfg: TrainConfig,
    validate: Callable[[], float] | None = None,
    tokens_in: Callable[[object], int] = lambda b: 0,
    desc: str = "train",
) -> TrainResult:
    """Minimise ``loss_fn(batch)`` over ``params``; returns the history; leaves the best state in ``params``."""
    torch.manual_seed(cfg.seed)
    device = params[0].device if params else torch.device("cpu")
    for p in params:  # mixed precision: trainable parameters (and so the optimizer state) in float32
        if p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    parallel.broadcast_(params)  # no-op on one process
    main = parallel.is_main()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    best: list[torch.Tensor] | None = None
    best_val, best_step = math.inf, None
    history: list[float] = []
    vals: list[tuple[int, float]] = []
    tokens = 0
    started = time.time()
    cpu_started = time.process_time()
    bar = tqdm(range(cfg.steps), desc=desc, unit="step", disable=not main)
    step = 0
    for step in bar:
        batch = next(batches)
        loss = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        parallel.average_gradients_(params)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        history.append(parallel.mean_scalar(loss.item(), device))
        tokens += round(parallel.mean_scalar(float(tokens_in(batch)), device) * parallel.world_size())
        last = (step + 1 == cfg.steps) or (
            cfg.time_budget_s is not None and parallel.main_decides(time.time() - started > cfg.time_budget_s, device)
        )
        if validate is not None and main and ((step + 1) % cfg.eval_every == 0 or last):
            with torch.no_grad():
                v = validate()
            vals.append((step + 1, v))
            if v < best_val:
                best_val, best_step = v, step + 1
                best = [p.detach().clone() for p in params]
            bar.set_postfix(loss=f"{history[-1]:.3f}", val_ppl=f"{math.exp(min(v, 50)):.2f}")
        else:
            bar.set_postfix(loss=f"{history[-1]:.3f}")
        if last:
            break
    bar.close()
    if best is not None:
        with torch.no_grad():
            for p, b in zip(params, best):
                p.copy_(b)
    seconds = time.time() - started
    log.info(
        "%s: %d steps in %.1fs, best val loss %s at step %s",
        desc,
        step + 1,
        seconds,
        f"{best_val:.4f}" if best is not None else "n/a",
        best_step,
    )
    return TrainResult(
        steps=step + 1,
        seconds=seconds,
        train_loss=history,
        val_loss=vals,
        best_val_loss=best_val if best is not None else None,
        best_step=best_step,
        tokens=tokens,
        cpu_seconds=time.process_time() - cpu_started,
    )

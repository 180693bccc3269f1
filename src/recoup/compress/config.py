"""The typed, validated compression config (docs/design.md, house style 1): shared keys here, per-method keys in
each method's own file.

:class:`CompressConfig` holds what every method understands (method, sparsity / N:M pattern, bits,
group size, symmetric grid, targets, calibration batch). A method that takes more (GPTQ's act-order,
the OBS block size, AWQ's grid) declares a :class:`MethodOptions` subclass beside its math and names it
in its :class:`~recoup.compress.methods.base.Method`; ``CompressConfig.from_dict`` routes those keys there,
so a key another method owns is an error that names the method it belongs to. ``to_dict`` flattens both
(a recipe step, a manifest and the CLI all use the same flat key names).

N:M follows the NVIDIA convention: N weights are *kept* in every group of M consecutive input
columns of a row (2:4 keeps 2 of 4, i.e. 50% sparsity).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

from recoup.config import Config, check
from recoup.errors import RecoupError
from recoup.registry import unknown_name_message

TARGETS = ("all", "attention", "mlp")
ACTIVATION_DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4) with 1 <= N < M; anything else raises RecoupError."""
    try:
        n_str, m_str = pattern.split(":")
        n, m = int(n_str), int(m_str)
    except (ValueError, AttributeError):
        raise RecoupError(f"pattern '{pattern}' is not of the form N:M (e.g. 2:4 keeps 2 of every 4 weights)") from None
    check(1 <= n < m <= 64, f"pattern {pattern}: need 1 <= N < M <= 64 (N kept of every M weights)")
    return n, m


@dataclasses.dataclass
class MethodOptions(Config):
    """Keys only one method (or a family sharing math) takes; subclass it in the method's file.

    ``check(config)`` may reject combinations with the shared keys (one clear line)."""

    def check(self, config: "CompressConfig") -> None:
        return None


def _methods():
    from recoup.compress.methods import METHODS  # lazy: the method files import this module

    return METHODS


def option_owners() -> dict[str, list[str]]:
    """Every per-method key -> the methods that take it (for CLI flags and helpful errors)."""
    owners: dict[str, list[str]] = {}
    registry = _methods()
    for name in registry.names():
        for key in registry.get(name).options.field_names():
            owners.setdefault(key, []).append(name)
    return owners


@dataclasses.dataclass
class CompressConfig(Config):
    """What to compress and how. ``options`` holds the method's own keys (defaults: the papers')."""

    method: str = "sparsegpt"
    sparsity: float | None = None  # fraction of weights set to zero in each targeted linear (0-0.99)
    pattern: str | None = None  # "N:M" semi-structured sparsity (N kept of every M)
    bits: int | None = None  # quantization bits (2-8); with sparsegpt: joint sparse + quantized pass
    group_size: int | None = None  # columns per quantization group; None (or -1) = one group per row
    sym: bool = True  # symmetric grid (zero point in the middle) or asymmetric (min/max)
    scale_dtype: str = "float32"  # float16: grid scales rounded to fp16, so a GGUF Q4_0/Q4_1/Q8_0 export is exact
    scale_search: str = "minmax"  # minmax | mse: each group's range as is, or shrunk to the least-error one
    targets: str = "all"  # all | attention | mlp
    # calibration windows per forward in the engine; None: 1 where each layer runs straight through (the reference
    # code's and llm-compressor's; on CPU its intermediates stay in cache), 8 on the one-forward-per-layer path,
    # where every batch is a parked forward in its own thread (and, on CPU, its own pool of worker threads)
    batch_size: int | None = None
    # memory (MiB) for the calibration activations: the one-forward-per-layer engine parks its forwards only within
    # it, and activations larger than it live in a memory-mapped temporary file, processed batch by batch (the same
    # result). None: in memory, parked forwards up to half the device's free memory; 0: re-run per group, in a file
    activation_budget_mb: int | None = None
    # dtype the engine stores the calibration activations in between layers: auto (the layers' own: float32 on
    # CPU, as before) | float32 | bfloat16 (half the memory; each layer's inputs rounded to bf16) | float16
    activation_dtype: str = "auto"
    options: Any = None  # the method's MethodOptions (a mapping is validated into it)

    @classmethod
    def base_fields(cls) -> list[str]:
        return [f for f in cls.field_names() if f != "options"]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "") -> "CompressConfig":
        """Flat keys -> config: shared keys here, the rest to the method's options (did-you-mean on misses)."""
        prefix = f"{where}: " if where else ""
        data = dict(data)
        method = data.get("method", cls.method)
        if not isinstance(method, str):
            raise RecoupError(f"{prefix}method must be a string (got {method!r})")
        spec = _methods().get(method)
        base = {k: data.pop(k) for k in cls.base_fields() if k in data}
        own = spec.options.field_names()
        owners = option_owners()
        for key in data:
            if key in own:
                continue
            if key in owners:
                raise RecoupError(f"{prefix}'{key}' is an option of {', '.join(owners[key])}, not of {method}")
            allowed = cls.base_fields() + own
            close = difflib.get_close_matches(key, allowed + list(owners), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise RecoupError(f"{prefix}unknown key '{key}' for method {method}{hint} allowed: {', '.join(allowed)}")
        try:
            return cls(**base, options=spec.options.from_dict(data, where=where or method))
        except TypeError as exc:
            raise RecoupError(f"{prefix}{exc}") from None

    def __post_init__(self) -> None:
        spec = _methods().get(str(self.method))  # unknown method -> did-you-mean
        if self.options is None:
            self.options = spec.options()
        elif isinstance(self.options, Mapping):
            self.options = spec.options.from_dict(self.options, where=self.method)
        check(
            type(self.options) is spec.options,
            f"options of {self.method} must be {spec.options.__name__} (got {type(self.options).__name__})",
        )
        if self.sparsity is not None:
            check(
                isinstance(self.sparsity, (int, float)) and not isinstance(self.sparsity, bool),
                f"sparsity must be a number in [0, 0.99] (got {self.sparsity!r})",
            )
            self.sparsity = float(self.sparsity)
            check(0.0 <= self.sparsity <= 0.99, f"sparsity must be in [0, 0.99] (got {self.sparsity})")
        if self.pattern is not None:
            n, m = parse_pattern(self.pattern)
            implied = 1.0 - n / m
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-6:
                raise RecoupError(
                    f"pattern {self.pattern} means {implied:.0%} sparsity but sparsity={self.sparsity} "
                    f"was given; drop the sparsity or set it to {implied:g}"
                )
            self.sparsity = implied
        if self.bits is not None:
            check(
                isinstance(self.bits, int) and not isinstance(self.bits, bool) and 2 <= self.bits <= 8,
                f"bits must be a whole number from 2 to 8 (got {self.bits!r})",
            )
        if self.group_size is not None:
            check(
                isinstance(self.group_size, int) and not isinstance(self.group_size, bool),
                f"group_size must be a whole number (got {self.group_size!r})",
            )
            if self.group_size == -1:
                self.group_size = None  # GPTQ convention: -1 = per row
            else:
                check(
                    self.group_size >= 2,
                    f"group_size must be >= 2, or -1 for one group per row (got {self.group_size})",
                )
        check(self.targets in TARGETS, unknown_name_message("targets", str(self.targets), TARGETS))
        check(
            self.batch_size is None
            or (isinstance(self.batch_size, int) and not isinstance(self.batch_size, bool) and self.batch_size >= 1),
            f"batch_size must be >= 1 (got {self.batch_size!r})",
        )
        if self.activation_budget_mb is not None:
            check(
                isinstance(self.activation_budget_mb, int)
                and not isinstance(self.activation_budget_mb, bool)
                and self.activation_budget_mb >= 0,
                f"activation_budget_mb must be a whole number of MiB >= 0 (got {self.activation_budget_mb!r})",
            )
        check(
            self.activation_dtype in ACTIVATION_DTYPES,
            unknown_name_message("activation_dtype", str(self.activation_dtype), ACTIVATION_DTYPES),
        )
        self._check_method(spec)

    def _check_method(self, spec) -> None:
        m = self.method
        if spec.prune == "required":
            check(self.sparsity is not None, f"{m} prunes: give a sparsity (e.g. 0.5) or a pattern (e.g. 2:4)")
        elif self.sparsity is not None:
            raise RecoupError(
                f"{m} does not prune; for sparse + quantized use --method sparsegpt --sparsity S --bits B"
            )
        if spec.quantize == "required":
            check(self.bits is not None, f"{m} quantizes: give bits (2-8), e.g. bits=4")
        elif spec.quantize == "never" and self.bits is not None:
            raise RecoupError(
                f"{m} does not quantize; joint sparse + quantized compression is "
                f"--method sparsegpt --sparsity S --bits B"
            )
        check(
            self.scale_dtype in ("float32", "float16"),
            f"scale_dtype must be float32 or float16 (got {self.scale_dtype!r})",
        )
        check(self.scale_search in ("minmax", "mse"), f"scale_search must be minmax or mse (got {self.scale_search!r})")
        if self.bits is None:
            check(self.group_size is None, "group_size only applies when quantizing (give bits)")
            check(self.scale_search == "minmax", "scale_search only applies when quantizing (give bits)")
        self.options.check(self)

    # convenience ----------------------------------------------------------------------------------
    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern) if self.pattern else None

    @property
    def prunes(self) -> bool:
        return self.sparsity is not None and (self.sparsity > 0 or self.pattern is not None)

    @property
    def quantizes(self) -> bool:
        return self.bits is not None

    def grid(self):
        """The quantization grid these keys describe (:class:`recoup.artifact.grid.QuantGrid`)."""
        from recoup.artifact.grid import QuantGrid

        return QuantGrid(self.bits, self.sym, self.group_size, scale_dtype=self.scale_dtype, search=self.scale_search)

    def describe(self) -> str:
        parts = [self.method]
        if self.pattern:
            parts.append(self.pattern)
        elif self.sparsity is not None:
            parts.append(f"{self.sparsity:.0%}")
        if self.bits is not None:
            g = f"g{self.group_size}" if self.group_size else "per-row"
            parts.append(f"{self.bits}-bit {'sym' if self.sym else 'asym'} {g}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Flat: the shared keys and the method's own (what recipes, manifests and the CLI use)."""
        out = {k: getattr(self, k) for k in self.base_fields()}
        out.update(self.options.to_dict())
        return out

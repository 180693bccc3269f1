"""What a recovery method is, for the registry (:mod:`recoup.recover.methods`).

A method is ``{name, config class, fit(loaded, config, data) -> (Recovery, TrainResult | None), load(dir)}``:

- ``config``: its typed config (:class:`recoup.config.Config`); a trained method derives from
  :class:`recoup.recover.train.FitConfig`, so it shares the data keys (``data``/``task`` ...) and the loop's;
- ``fit``: learns the recovery on ``loaded`` (the model stays bit-identical). ``data`` is the
  :class:`recoup.recover.task_data.TuningData` the stage built from the config's data keys (None for a
  method whose config is not a FitConfig, e.g. a hard prompt);
- ``load``: reads a saved directory back; ``peft_type`` names the PEFT layout it saves (``LORA``,
  ``PROMPT_TUNING``) when it saves one, so a plain PEFT directory loads too.

The recovery contract itself (``prefix`` / ``apply`` / ``save``) is :class:`recoup.model.recovery.Recovery`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from recoup.model.recovery import Recovery


@dataclasses.dataclass(frozen=True)
class RecoveryMethod:
    name: str
    help: str
    config: type
    fit: Callable[[Any, Any, Any], tuple[Recovery, Any]]
    load: Callable[[Path], Recovery]
    peft_type: str | None = None

    @property
    def trains(self) -> bool:
        """Whether it learns from data (its config carries the FitConfig keys)."""
        from recoup.recover.train import FitConfig

        return issubclass(self.config, FitConfig)

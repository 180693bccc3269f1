"""``python -m recoup ...``: the ``recoup`` command, also as launched by ``torchrun --nproc-per-node N -m recoup ...``
or ``accelerate launch -m recoup ...`` (data parallel: :mod:`recoup.model.parallel`). Under a launcher each rank
pins its own GPU, ranks other than 0 print nothing and log only warnings, and the process group is closed at exit."""

from __future__ import annotations

import contextlib
import os
import sys


def run(argv: list[str] | None = None) -> int:
    from recoup.cli import main
    from recoup.model import parallel

    parallel.setup_process()
    quiet = open(os.devnull, "w") if not parallel.is_main() else None
    try:
        with contextlib.redirect_stdout(quiet) if quiet else contextlib.nullcontext():
            return main(argv)
    finally:
        if quiet:
            quiet.close()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run())

"""recoup compress MODEL --method M ... --out DIR"""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from recoup.commands.flags import add_job_arguments
    from recoup.compress import METHODS

    p = sub.add_parser(
        "compress",
        help="prune and/or quantize a model into a compressed artifact",
        description="Compress MODEL with one sequential layer-by-layer pass and write an artifact "
        "(safetensors + tokenizer + recoup.json) that `recoup eval DIR` loads. "
        "--method sparsegpt --sparsity 0.5 --bits 4 is the joint sparse+quantized pass. "
        f"Methods: {', '.join(METHODS.names())}. Every flag is also a key of a recipe's "
        "compress step.",
    )
    add_job_arguments(p, "compress")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from recoup.commands.flags import job_from_args
    from recoup.errors import RecoupError
    from recoup.runs.stages import compress

    if args.method is None or args.out is None:
        raise RecoupError("give --method M and --out DIR")
    job = job_from_args(args, "compress")
    result = compress(job)
    rep, storage = result["report"], result["storage"]
    print(
        f"{job.config.describe()}: {len(rep['linears'])} linears, sparsity {rep['sparsity']:.4f}, "
        f"mean relative error {rep['mean_error']:.4g}, {rep['seconds']:.1f}s, peak RSS {rep['peak_rss_mb']:.0f} MiB"
    )
    print(f"wrote {result['artifact']} ({storage['kind']}, {storage['bytes'] / 1e6:.1f} MB on disk)")
    return 0

"""recoup compress MODEL --method M ... --out DIR"""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger(__name__)


def register(sub) -> None:
    from recoup.compress import METHODS
    from recoup.compress.config import TARGETS

    METHOD_NAMES = METHODS.names()

    p = sub.add_parser("compress", help="prune and/or quantize a model into a compressed artifact",
                       description="Compress MODEL with one sequential layer-by-layer pass and write an artifact "
                                   "(safetensors + tokenizer + recoup.json) that `recoup eval DIR` loads. "
                                   "--method sparsegpt --sparsity 0.5 --bits 4 is the joint sparse+quantized pass.")
    p.add_argument("model", help="model source (smollm2-135m, a .gguf, a local HF dir, a hub id)")
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHOD_NAMES)}")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of weights to prune (0-0.99)")
    p.add_argument("--pattern", default=None, help="N:M semi-structured sparsity, N kept of every M (e.g. 2:4)")
    p.add_argument("--bits", type=int, default=None, help="quantization bits (2-8)")
    p.add_argument("--group-size", type=int, default=None, help="columns per quantization group (-1: per row)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric (min/max) grid")
    p.add_argument("--act-order", action="store_true", help="GPTQ: columns in order of decreasing Hessian diagonal")
    p.add_argument("--static-groups", action="store_true", help="GPTQ + act-order: fix group grids before reordering")
    p.add_argument("--blocksize", type=int, default=128, help="OBS block size for sparsegpt/gptq (default 128)")
    p.add_argument("--percdamp", type=float, default=0.01, help="Hessian dampening for sparsegpt/gptq (default 0.01)")
    p.add_argument("--targets", default="all", help=f"which linears: {', '.join(TARGETS)} (default all)")
    p.add_argument("--calib", default="ptb", help="calibration corpus: ptb, wiki, or a .txt/.jsonl file (default ptb)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=512,
                   help="calibration window length in tokens (default 512 on this CPU build; the papers use 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window offsets (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward (default 8)")
    p.add_argument("--dtype", default="float32", help="dtype to load and save the model in (default float32)")
    p.add_argument("--device", default="auto",
                   help="where the layers are compressed: auto (cuda when available, else cpu), cpu, cuda, cuda:N; "
                        "on a GPU the model stays on CPU and one decoder layer at a time moves to it (default auto)")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--storage", choices=("packed", "dense"), default="packed",
                   help="packed: quantized weights as bit-packed integer codes, sparse ones as a bitmask + kept "
                        "values (loads to the same weights, bit for bit); dense: fake-quant weights in --dtype "
                        "(default packed)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from recoup.compress import CompressConfig, compress
    from recoup.artifact.store import save_artifact
    from recoup.data.calibration import calibration_windows
    from recoup.artifact import load_model
    from recoup.model.load import ARTIFACT_MANIFEST

    config = CompressConfig.from_dict({
        "method": args.method, "sparsity": args.sparsity, "pattern": args.pattern, "bits": args.bits,
        "group_size": args.group_size, "sym": args.sym, "targets": args.targets, "batch_size": args.batch_size,
        **({"blocksize": args.blocksize, "percdamp": args.percdamp} if args.method in ("sparsegpt", "gptq") else {}),
        **({"act_order": args.act_order, "static_groups": args.static_groups} if args.method == "gptq" else {})})
    loaded = load_model(args.model, dtype=args.dtype)
    calibration = None
    from recoup.compress.methods import METHODS

    if METHODS.get(config.method).stats != "none":
        calibration = calibration_windows(loaded.tokenizer, args.calib, args.nsamples, args.seqlen, args.seed)
    report = compress(loaded, config, calibration, device=args.device)
    out = save_artifact(loaded, report, args.out, storage=args.storage)
    print(f"{config.describe()}: {len(report.linears)} linears, sparsity {report.sparsity:.4f}, "
          f"mean relative error {report.mean_error:.4g}, {report.seconds:.1f}s, peak RSS {report.peak_rss_mb:.0f} MiB")
    storage = json.loads((out / ARTIFACT_MANIFEST).read_text())["storage"]
    print(f"wrote {out} ({storage['kind']}, {storage['bytes'] / 1e6:.1f} MB on disk)")
    return 0

"""Where SparseGPT 50%'s time goes in its reference order (the default): the bundled model, N x 512 PTB-train
(seed 0), recoup's defaults; seconds in each engine step, the Hessian accumulation timed inside the observe step.

    python sparsegpt_phases.py N [OUT.json]     (session 15: N=128, 2 threads, alone on the machine)"""
import collections, json, os, sys, time

import torch

from recoup.artifact import load_model
from recoup.compress import CompressConfig, compress, engine, stats
from recoup.data.calibration import calibration_windows

N = int(sys.argv[1])
T = collections.Counter()


def timed(owner, name, key):
    f = getattr(owner, name)

    def g(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            T[key] += time.perf_counter() - t
    setattr(owner, name, g)


for n in ("_observe", "_compress_groups", "_propagate"):
    timed(engine, n, n.strip("_"))
timed(stats.HessianStats, "add", "hessian_add")
loaded = load_model("smollm2-135m")
cal = calibration_windows(loaded.tokenizer, "ptb", N, 512, 0)
cfg = CompressConfig.from_dict({"method": "sparsegpt", "sparsity": 0.5})
load0 = os.getloadavg()
t = time.perf_counter()
rep = compress(loaded, cfg, cal)
out = {"nsamples": N, "seqlen": 512, "threads": torch.get_num_threads(), "batch_size": rep.config["batch_size"],
       "total_s": time.perf_counter() - t, **{f"{k}_s": v for k, v in T.items()},
       "observe_forward_s": T["observe"] - T["hessian_add"], "load_avg_start": load0, "load_avg_end": os.getloadavg()}
print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in out.items()}))
if len(sys.argv) > 2:
    with open(sys.argv[2], "w") as f:
        json.dump(out, f, indent=1)

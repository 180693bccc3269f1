"""One decoder layer's seven linears (the bundled model's shapes: q 576x576, k/v 192x576, o 576x576, gate/up
1536x576, down 576x1536) compressed one at a time and side by side on THREADS threads (min of 5), with their
own Hessians shared as the engine shares them; the weights must be bitwise equal.

    python benchmarks/results/compress13/side_by_side_timing.py [THREADS]"""
import sys, time
import torch
from recoup.artifact.grid import QuantGrid
from recoup.compress.obs import obs_compress
from recoup.compress.parallel import side_by_side
from recoup.compress.stats import FactorCache

threads = int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads()
torch.manual_seed(0)
def H(c, n=2048):
    x = torch.randn(n, c) * torch.rand(c) * 3; return 2 * x.t() @ x / n
g = QuantGrid(bits=4, group_size=64, sym=True)
shapes = {"q": (576, 576, "attn"), "k": (192, 576, "attn"), "v": (192, 576, "attn"), "o": (576, 576, "o"),
          "gate": (1536, 576, "mlp"), "up": (1536, 576, "mlp"), "down": (576, 1536, "down")}
hs = {"attn": H(576), "o": H(576), "mlp": H(576), "down": H(1536)}
ws = {n: torch.randn(r, c) for n, (r, c, _) in shapes.items()}
for label, kw in (("sparsegpt 50%", dict(sparsity=0.5)), ("gptq w4 g64", dict(grid=g, act_order=True, static_groups=True))):
    ta, tb = [], []
    for rep in range(5):
        caches = {k: FactorCache() for k in hs}
        run = lambda n: obs_compress(ws[n], hs[shapes[n][2]], factors=caches[shapes[n][2]], **kw).weight
        t = time.time(); a = [run(n) for n in shapes]; ta.append(time.time() - t)
        caches = {k: FactorCache() for k in hs}
        t = time.time(); b = side_by_side(run, list(shapes), [ws[n].numel() for n in shapes], threads); tb.append(time.time() - t)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    print(f"{label}: one at a time {min(ta)*1000:6.0f} ms, side by side on {threads} threads {min(tb)*1000:6.0f} ms, x{min(ta)/min(tb):.2f}", flush=True)

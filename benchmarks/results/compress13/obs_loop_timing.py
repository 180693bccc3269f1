import sys, time, torch
sys.path.insert(0, "/work/s8")
import obs_old
from recoup.compress.obs import obs_compress
from recoup.artifact.grid import QuantGrid
torch.manual_seed(0)
def H(c, n=2048):
    x = torch.randn(n, c) * torch.rand(c) * 3; return 2*x.t()@x/n
g = QuantGrid(bits=4, group_size=64, sym=True)
hs = {576: H(576), 1536: H(1536)}
tot = {"old": 0, "new": 0}
for kwname, kw in (("sp50", dict(sparsity=0.5)), ("gptq w4", dict(grid=g, act_order=True, static_groups=True)), ("sp50+w4", dict(sparsity=0.5, grid=g))):
  for (r, c) in [(576, 576), (192, 576), (1536, 576), (576, 1536)]:
    w = torch.randn(r, c); h = hs[c]
    ta, tb = [], []
    for rep in range(5):
        t = time.time(); obs_old.obs_compress(w, h, **kw); ta.append(time.time() - t)
        t = time.time(); obs_compress(w, h, **kw); tb.append(time.time() - t)
    print(f"{kwname:8s} {r}x{c}: old {min(ta)*1000:5.0f} new {min(tb)*1000:5.0f} ms  x{min(ta)/min(tb):.2f}", flush=True)

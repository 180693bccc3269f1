"""The OBS loop before and after session 8, timed on one thread (min of 5) at the bundled model's shapes.

The old loop is read from git (the commit before the change, 2a483ec), so run it inside the repository:
    python benchmarks/results/compress13/obs_loop_timing.py"""
import importlib.util, subprocess, sys, tempfile, time
import torch
from recoup.artifact.grid import QuantGrid
from recoup.compress.obs import obs_compress

src = subprocess.run(["git", "show", "2a483ec:src/recoup/compress/obs.py"], capture_output=True, text=True, check=True).stdout
path = tempfile.NamedTemporaryFile("w", suffix="_obs_old.py", delete=False)
path.write(src)
path.close()
spec = importlib.util.spec_from_file_location("obs_old", path.name)
obs_old = importlib.util.module_from_spec(spec)
sys.modules["obs_old"] = obs_old  # its dataclasses look their module up
spec.loader.exec_module(obs_old)

torch.manual_seed(0)
def H(c, n=2048):
    x = torch.randn(n, c) * torch.rand(c) * 3; return 2*x.t()@x/n
g = QuantGrid(bits=4, group_size=64, sym=True)
hs = {576: H(576), 1536: H(1536)}
for kwname, kw in (("sp50", dict(sparsity=0.5)), ("gptq w4", dict(grid=g, act_order=True, static_groups=True)), ("sp50+w4", dict(sparsity=0.5, grid=g))):
  for (r, c) in [(576, 576), (192, 576), (1536, 576), (576, 1536)]:
    w = torch.randn(r, c); h = hs[c]
    ta, tb = [], []
    for rep in range(5):
        t = time.time(); a = obs_old.obs_compress(w, h, **kw); ta.append(time.time() - t)
        t = time.time(); b = obs_compress(w, h, **kw); tb.append(time.time() - t)
    assert torch.equal(a.weight, b.weight)
    print(f"{kwname:8s} {r}x{c}: old {min(ta)*1000:5.0f} new {min(tb)*1000:5.0f} ms  x{min(ta)/min(tb):.2f}", flush=True)

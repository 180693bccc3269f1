"""One decoder layer of the bundled model on 32 windows of 512 tokens, 1/2/4/8/16 windows per call, min of 3.

    python layer_batch_timing.py THREADS      (session 10, 1 thread: batch 1 0.88x the time of batch 8)"""
import time, torch, sys
from transformers import AutoModelForCausalLM
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
m = AutoModelForCausalLM.from_pretrained("/root/.cache/recoup/models/smollm2-135m", dtype=torch.float32).eval()
layer = m.model.layers[3]
N, T, H = 32, 512, 576
x = torch.randn(N, T, H)
pos = torch.arange(T)[None]
pe = m.model.rotary_emb(x[:1], pos)
res = {}
with torch.no_grad():
    for rep in range(3):
        for bs in (1, 2, 4, 8, 16):
            t = time.perf_counter()
            for s in range(0, N, bs):
                layer(x[s:s+bs], attention_mask=None, position_ids=pos, position_embeddings=pe)
            dt = time.perf_counter() - t
            res[bs] = min(res.get(bs, 9e9), dt)
print({b: round(v, 3) for b, v in res.items()}, "ratio to bs8", {b: round(v / res[8], 3) for b, v in res.items()})

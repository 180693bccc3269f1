#!/bin/bash
# AWQ / GPTQ / RTN w3 g64 sym: calibration 32 x 512 PTB-train, PTB-test 8 x 2048 (this branch's HEAD snapshot)
cd /tmp/c2m1
echo "== start $(date -u +%H:%M:%S) load: $(uptime)"
OMP_NUM_THREADS=1 PYTHONPATH=/tmp/c2m1/src /work/main/.venv/bin/python benchmarks/compress.py --recipes awq-w3g64,gptq-w3g64,rtn-w3g64 \
  --nsamples 32 --seqlen 512 --limit 8 --json /work/wt/c2logs/w3_32x512_ptb8.json
echo "== end $(date -u +%H:%M:%S) load: $(uptime)"

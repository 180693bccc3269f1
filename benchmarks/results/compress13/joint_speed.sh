#!/bin/bash
# joint 8x (sparsegpt 50% + w4g64) compression time (wall and CPU seconds), 32 x 512 PTB-train, no perplexity:
# before (commit c0ee07d, the branch point) and after (this branch), alternating, twice
cd /tmp/c2after
for rep in 1 2; do
for which in before after; do
  if [ $which = before ]; then PP=/tmp/c2before/src; else PP=/tmp/c2after/src; fi
  echo "== $which $rep $(date -u +%H:%M:%S) load: $(uptime)"
  OMP_NUM_THREADS=2 PYTHONPATH=$PP /work/main/.venv/bin/python benchmarks/compress.py --recipes sparsegpt-50+w4g64 \
    --nsamples 32 --seqlen 512 --no-ppl --json /work/wt/c2logs/joint_${which}_$rep.json
done
done
echo "== end $(date -u +%H:%M:%S) load: $(uptime)"

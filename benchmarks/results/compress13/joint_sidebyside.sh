#!/bin/bash
# joint 8x (sparsegpt 50% + w4g64), 32 x 512 PTB-train, compression only: before (c0ee07d) and after (main)
# run side by side, one thread each, so both see the same load
cd /work/main
for which in before after; do
  if [ $which = before ]; then PP=/tmp/c2before/src; else PP=/work/main/src; fi
  OMP_NUM_THREADS=1 PYTHONPATH=$PP /work/main/.venv/bin/python /work/main/benchmarks/compress.py --recipes sparsegpt-50+w4g64 \
    --nsamples 32 --seqlen 512 --no-ppl --json /work/logs/joint/joint_$which.json > /work/logs/joint/$which.log 2>&1 &
done
wait

#!/bin/bash
# trained-pool check of K: smoke-size IDP training on the bundled model, one run per K
cd /work/wt/idp1
for K in 1 2 4; do
  OMP_NUM_THREADS=1 PYTHONPATH=src /work/main/.venv/bin/python -m recoup.cli recover smollm2-135m --method idp --data ptb \
    --pool 4 --tokens 20 --seqlen 128 --batch-size 4 --steps 16 --eval-every 8 --val-windows 8 --select-layers $K \
    --out /tmp/idp_k$K > /tmp/idp_k$K.log 2>&1
  echo "K=$K rc=$? $(date -u +%T)"
done

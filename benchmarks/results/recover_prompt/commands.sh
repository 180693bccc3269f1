#!/bin/bash
# Sequential real-model pipeline (one heavy job at a time). Logs in /tmp/p5/.
set -x
cd /work/main && . .venv/bin/activate
export OMP_NUM_THREADS=1
A=/work/artifacts/smollm2-8x
P=/work/artifacts/prompts
mkdir -p $P
while [ ! -f $A/recoup.json ]; do sleep 20; done
date
/usr/bin/time -v recoup recover $A --method soft-prompt --tokens 20 --data ptb --seqlen 256 --batch-size 2 --lr 0.03 \
   --steps 80 --eval-every 15 --val-windows 4 --seed 0 --time-budget 720 --out $P/smollm2-8x-sp20 --force > /tmp/p5/sp8x.log 2>&1
date
recoup eval $A --tasks ppl:ptb,ppl:wiki --limit 4 --json /tmp/p5/8x.json > /tmp/p5/8x_eval.log 2>&1
recoup eval $A --tasks ppl:ptb,ppl:wiki --limit 4 --recovery $P/smollm2-8x-sp20 --json /tmp/p5/8x_sp.json > /tmp/p5/8x_sp_eval.log 2>&1
date
/usr/bin/time -v recoup recover $A --method idp --pool 4 --tokens 20 --data ptb --seqlen 256 --batch-size 2 --lr 0.03 \
   --steps 80 --eval-every 15 --val-windows 4 --seed 0 --time-budget 720 --out $P/smollm2-8x-idp4x20 --force > /tmp/p5/idp8x.log 2>&1
date
for t in arc_easy boolq; do
  recoup eval $A --tasks $t --limit 100 --json /tmp/p5/8x_$t.json > /tmp/p5/8x_$t.log 2>&1
  recoup eval $A --tasks $t --limit 100 --recovery $P/smollm2-8x-sp20 --json /tmp/p5/8x_sp_$t.json > /tmp/p5/8x_sp_$t.log 2>&1
  recoup eval $A --tasks $t --limit 100 --recovery $P/smollm2-8x-idp4x20 --json /tmp/p5/8x_idp_$t.json > /tmp/p5/8x_idp_$t.log 2>&1
done
date
echo CHAIN DONE
# then (chain3):
recoup eval /work/artifacts/smollm2-8x --tasks ppl:ptb --limit 4 --prompt-text "The weight matrix inside the language model contains errors. Make any necessary adjustments to ensure optimal performance." --json /tmp/p5/8x_hard.json
recoup eval /work/artifacts/smollm2-8x --tasks ppl:ptb --limit 4 --recovery $P/smollm2-8x-idp4x20 --json /tmp/p5/8x_idp_ptb.json
recoup eval /work/artifacts/smollm2-sgpt40 --tasks ppl:ptb --limit 4 --json /tmp/p5/sgpt40.json
recoup eval /work/artifacts/smollm2-sgpt40 --tasks ppl:ptb --limit 4 --recovery $P/smollm2-8x-sp20 --json /tmp/p5/sgpt40_sp.json
python benchmarks/recover.py --model /work/artifacts/smollm2-8x --skip-train --prompt $P/smollm2-8x-sp20 --idp $P/smollm2-8x-idp4x20 --prompt-len 128 --new-tokens 16 --repeats 3 --json benchmarks/results/recover/latency_8x.json
# dense eval and training-throughput benchmark:
recoup eval smollm2-135m --tasks ppl:ptb,ppl:wiki --limit 4 --json /tmp/p5/dense.json
OMP_NUM_THREADS=1 python benchmarks/recover.py --model smollm2-135m --steps 4 --seqlen 256 --batch-size 4 --prompt-len 128 --new-tokens 16 --repeats 3 --json benchmarks/results/recover/dense.json
recoup eval smollm2-135m --tasks ppl:ptb --limit 4 --recovery /work/artifacts/prompts/smollm2-8x-sp20 --json /tmp/p5/dense_sp.json
recoup eval /work/artifacts/smollm2-sgpt60 --tasks ppl:ptb --limit 4 --json /tmp/p5/sgpt60.json
recoup eval /work/artifacts/smollm2-sgpt60 --tasks ppl:ptb --limit 4 --recovery /work/artifacts/prompts/smollm2-8x-sp20 --json /tmp/p5/sgpt60_sp.json

# full PTB test (47 windows of 2048)
OMP_NUM_THREADS=1 recoup eval /work/artifacts/smollm2-8x --tasks ppl:ptb --seqlen 2048 --json 8x_full_ptb.json
OMP_NUM_THREADS=1 recoup eval /work/artifacts/smollm2-8x --tasks ppl:ptb --seqlen 2048 --recovery /work/artifacts/prompts/smollm2-8x-sp20 --json 8x_sp_full_ptb.json

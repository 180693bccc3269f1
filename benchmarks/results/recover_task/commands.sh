#!/bin/bash
set -x
cd /work/main && source .venv/bin/activate

export TQDM_DISABLE=1
A=/work/artifacts; P=$A/prompts
B="--seqlen 160 --batch-size 4 --steps 40 --eval-every 20 --tokens 20 --seed 0"
for t in sciq arc_easy; do
  /usr/bin/time -f "%e s wall %M KB" recoup recover $A/smollm2-8x --method soft-prompt --task $t $B --out $P/$t-8x-sp20 --force
  /usr/bin/time -f "%e s wall %M KB" recoup recover $A/smollm2-8x --method idp --pool 4 --task $t $B --out $P/$t-8x-idp4x20 --force
done
/usr/bin/time -f "%e s wall" recoup compare-recovery --task sciq --dense smollm2-135m --compressed $A/smollm2-8x \
  --soft-prompt ptb=$P/smollm2-8x-sp20 --soft-prompt sciq=$P/sciq-8x-sp20 --idp ptb=$P/smollm2-8x-idp4x20 --idp sciq=$P/sciq-8x-idp4x20 \
  --lora $A/adapters/sciq-8x-lora --cpet $A/adapters/sciq-8x-cpet --limit 200 --repeats 3 --json $A/compare-sciq-8x-all.json
/usr/bin/time -f "%e s wall" recoup compare-recovery --task arc_easy --dense smollm2-135m --compressed $A/smollm2-8x \
  --soft-prompt arc_easy=$P/arc_easy-8x-sp20 --idp arc_easy=$P/arc_easy-8x-idp4x20 --repeats 3 --json $A/compare-arc-8x-prompts.json
echo CHAIN DONE

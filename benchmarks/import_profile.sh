#!/usr/bin/env bash
# Where a worker's imports go (issue #17, serve readiness): `python3 -X importtime` of the wanfast modules,
# then transformers' AutoTokenizer, UMT5EncoderModel and Inductor, twice each; variant b imports
# torch._dynamo before transformers (which otherwise pulls it in). One line of times per run on stdout,
# the -X importtime trees under $OUT/importtime_<variant><run>.txt.
#   bash benchmarks/import_profile.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/wheels.sh
for v in a b; do
    for i in 1 2; do
        python3 -X importtime -c "
import time; t0 = time.perf_counter()
import torch, wanfast.builder, wanfast.pipeline, wanfast.loading.layout
t1 = time.perf_counter()
if '$v' == 'b':
    import torch._dynamo
t2 = time.perf_counter()
from transformers import AutoTokenizer
t3 = time.perf_counter()
from transformers import UMT5EncoderModel
t4 = time.perf_counter()
import torch._dynamo, torch._inductor.compile_fx
t5 = time.perf_counter()
print('$v$i base %.2f dynamo %.2f tok %.2f model %.2f dynamo+inductor-after %.2f' % (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4))
" 2> "${OUT:-/tmp/out}/importtime_$v$i.txt"
    done
done
python3 -c "import transformers, tokenizers; print(transformers.__version__, tokenizers.__version__)"

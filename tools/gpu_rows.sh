#!/usr/bin/env bash
# The README's GPU rows in one run, for a lent GPU machine (a tool: nothing in the method runs it).
#   bash tools/gpu_rows.sh OUT_DIR [RAFT_LARGE_PTH]
# Each row is one command of docs/performance.md, bounded by its own timeout so that a slow or failing row leaves
# the others' results; the JSONs land in OUT_DIR, each row's log in a temporary folder (its tail is printed).
# SMALL=1 runs the same commands at toy sizes on any machine (a check that they start, before device time is spent).
# Sampling counts no FLOPs here (a meta-device count of 100 U-Net calls is slow on the host and the same on any
# machine): `--flops meta` on the CPU gives them.
set -u
out=${1:?usage: bash tools/gpu_rows.sh OUT_DIR [RAFT_LARGE_PTH]}
raft=${2:-tests/fixtures/raft_small.pth}
mkdir -p "$out"
logs=$(mktemp -d)
export PYTHONUNBUFFERED=1
if [ "${SMALL:-0}" = 1 ]; then
  size=bench; sample_size=tiny; frames=2; latent=8x8; batch=1; image=32x32; ddim=2; scale=4
else
  size=vc2; sample_size=vc2; frames=16; latent=40x64; batch=8; image=320x512; ddim=50; scale=1
fi
row() {  # row NAME SECONDS COMMAND...: run it with a timeout (times scale), log it, say how it ended
  local name=$1 limit=$(($2 * scale)); shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$logs/$name.log" 2>&1
  local code=$?
  echo "== $name: exit $code in $((SECONDS - start)) s"
  if [ "$code" != 0 ]; then grep -m1 -A40 "Traceback" "$logs/$name.log"; fi  # the cause, before torchrun's summary
  tail -n 25 "$logs/$name.log"
}
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
text_encoder=openclip  # VideoCrafter2's, random weights; the byte encoder if open_clip is not installed
python3 -c "import open_clip" 2>/dev/null || text_encoder=bytes
row train 140 python3 -m tools.bench --size $size --batch $batch --frames $frames --latent $latent --dtype bf16 \
  --checkpointing --warmup 2 --steps 4 --json "$out/train.json"
row sample 140 python3 -m tools.bench --what sample --size $sample_size --frames $frames --latent $latent --dtype bf16 \
  --text-encoder $text_encoder --ddim-steps $ddim --warmup 1 --steps 2 --flops none --json "$out/sample.json"
row heatmap 60 python3 -m tools.bench --what heatmap --size $image --frames $frames --raft "$raft" --json "$out/heatmap.json"
for parallel in ddp shard; do  # one rank each: the per-rank state and step time of DDP against FSDP2
  row "states_$parallel" 100 torchrun --standalone --nproc_per_node 1 -m tools.memory --what states --size $size \
    --frames $frames --latent $latent --batch 2 --dtype bf16 --parallel $parallel --steps 4 --out "$out"
done

#!/usr/bin/env bash
# The GPU checks in one run, for a lent GPU machine (a tool: nothing in the method runs it); no network needed.
#   bash tools/gpu_rows.sh OUT_DIR [RAFT_LARGE_PTH]
# Rows: the versions; train.py end to end under torchrun (a small VideoCrafter2-layout model.ckpt, the real clips of
# ../shared/videos (the fixture's clip without it), 2 loader workers, validation samples and the motion monitor, a
# checkpoint, SIGTERM to the trainer mid-run, then --resume to the last step); 3 steps sharded against 3 under DDP,
# side by side; the README's GPU rows of docs/performance.md, and the vc2 step under torch.profiler
# (OUT_DIR/profile.txt; GPU only).
# Each row runs under its own timeout so that a slow or failing row leaves the others' results; a failing row prints
# its traceback and the script goes on, exiting 1 at the end. The JSONs, profile and runs land in OUT_DIR, each row's
# log in a temporary folder (its tail is printed).
# train.py runs as tests/test_commands.py's torchrun script: the one place the recipe's sizes are swapped for
# compact ones (tested there), so the run here is the recipe's code at VideoCrafter2's layout, small.
# SMALL=1 runs the same rows at toy sizes on the CPU (gloo, no profiler): tests/test_gpu_script.py. PYTHON names the
# interpreter (default python3), so that a venv need not be on PATH.
# Sampling counts no FLOPs here (a meta-device count of 100 U-Net calls is slow on the host and the same on any
# machine): `--flops meta` on the CPU gives them.
set -u
out=${1:?usage: bash tools/gpu_rows.sh OUT_DIR [RAFT_LARGE_PTH]}
mkdir -p "$out"
out=$(cd "$out" && pwd)
raft=$(realpath "${2:-$(dirname "$0")/../tests/fixtures/raft_small.pth}")
cd "$(dirname "$0")/.."  # the rows' commands name the repository's files
logs=$(mktemp -d)
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}  # the interpreter with the project's packages (a venv's need not be on PATH)
if [ "${SMALL:-0}" = 1 ]; then
  size=tiny; frames=2; latent=8x8; batch=1; image=32x32; ddim=2; scale=4
  # the kl-f8 decoder's bf16 convolutions take minutes on a CPU without bf16 units (emulated; AVX2 alone): fp32
  sample_dtype=fp32
  clip=(32 32); recipe=(--frames=4 --batch_size=1 --micro_batch=1); steps=4; every=2; stride=1
  timed=(--warmup 1 --steps 1)  # the toy rows only have to run: one timed step each
  counted=(--flops none)  # the meta-device FLOP count is seconds of Python on any host (tests/test_bench.py checks it)
else
  size=vc2; frames=16; latent=40x64; batch=8; image=320x512; ddim=50; scale=1; sample_dtype=bf16
  clip=(320 512); recipe=(--frames=16 --batch_size=4 --micro_batch=2); steps=24; every=4; stride=2
  timed=(--warmup 2 --steps 4)
  counted=()
fi
failed=0
row() {  # row NAME SECONDS COMMAND...: run it with a timeout (times scale), log it, say how it ended
  local name=$1 limit=$(($2 * scale)); shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$logs/$name.log" 2>&1
  local code=$?
  echo "== $name: exit $code in $((SECONDS - start)) s"
  if [ "$code" != 0 ]; then
    failed=1
    grep -m1 -A40 -E "^Traceback|^error:" "$logs/$name.log"  # the cause, before torchrun's summary
  fi
  tail -n 25 "$logs/$name.log"
}
stop_when_saved() {  # stop_when_saved RUN_DIR COMMAND...: SIGTERM COMMAND's trainer once RUN_DIR holds a checkpoint
  local run=$1; shift
  "$@" &
  local launcher=$!
  until [ -f "$run/latest" ] || ! kill -0 "$launcher" 2>/dev/null; do sleep 0.1; done
  # the trainer, torchrun's child, gets the scheduler's signal: train.py must save and exit 0 (torchrun then does)
  kill -TERM $(pgrep -P "$launcher") 2>/dev/null
  wait "$launcher"
}
export -f stop_when_saved

# ---- (d) versions
row versions 60 "$python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN',
  torch.backends.cudnn.version(), torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"

# ---- (a) train.py end to end: a checkpoint, SIGTERM mid-run, --resume to the last step
work=$out/train_work
rm -rf "$work" "$out/train" "$out/ddp" "$out/shard"
clips=../shared/videos
# the toy run reads the fixture's one short clip: heatmaps of the shared clips' 350 frames take minutes on a CPU
if [ ! -d "$clips" ] || [ "${SMALL:-0}" = 1 ]; then clips=tests/fixtures; fi
row files 240 "$python" - "$work" "$clips" "${clip[0]}x${clip[1]}" "$stride" "${SMALL:-0}" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
import data
import test_commands  # the shrunk sizes and VideoCrafter2's checkpoint layout, as the commands' test has them
work, clips, size, stride, small = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5] == "1"
test_commands.shrink(lambda d, k, v: d.__setitem__(k, v), setattr)
(work / "videos").mkdir(parents=True)
videos = sorted(p for p in clips.iterdir() if p.suffix in (".mp4", ".gif"))
for video in videos:
    if small:  # the toy run's 4-frame clips need 8 frames: RAFT on all 36 of the fixture's was most of this row
        clip = data.VideoFile(video)
        data.write_video(work / "videos" / video.name, clip.read(range(8)), fps=clip.fps)
    else:
        (work / "videos" / video.name).symlink_to(video.resolve())
captions = "".join(f"{v.name},a real clip of {v.stem}\n" for v in videos)
(work / "videos" / "captions.csv").write_text("path,caption\n" + captions)
test_commands.make_videocrafter2_checkpoint(work / "model.ckpt")
data.main(["heatmaps", str(work / "videos"), "--size", size, "--max-stride", stride,
              "--weights", "tests/fixtures/raft_small.pth"])
print(f"{len(videos)} clips of {clips}, {work / 'model.ckpt'}")
EOF
train=("$python" -m torch.distributed.run --standalone --nproc_per_node 1 tests/test_commands.py
       --data="$work/videos" --init="$work/model.ckpt" --height=${clip[0]} --width=${clip[1]} "${recipe[@]}"
       --max_stride=$stride --log_every=1)
row train_stopped 240 bash -c 'stop_when_saved "$@"' _ "$out/train" "${train[@]}" --workers=2 --steps=$steps \
  --ckpt_every=$every --sample_every=$every --monitor_weights=tests/fixtures/raft_small.pth --out_dir="$out/train"
row train_resumed 240 "${train[@]}" --workers=2 --steps=$steps --ckpt_every=$every --sample_every=$every \
  --monitor_weights=tests/fixtures/raft_small.pth --out_dir="$out/train" --resume
row resume_check 30 "$python" - "$out/train/log.jsonl" "$logs/train_stopped.log" "$steps" <<'EOF'
import json, re, sys
steps = [json.loads(line)["step"] for line in open(sys.argv[1]) if '"loss"' in line]
saved = [int(s) for s in re.findall(r"stop signal: saved step (\d+)", open(sys.argv[2]).read())]
last = int(sys.argv[3])
print(f"stopped run saved step {saved}; steps logged {steps}")
assert len(saved) == 1 and saved[0] < last, "the stop signal did not stop the run before its last step"
assert steps == list(range(1, last + 1)), "the resumed run did not continue from the saved step to the last"
print(f"resumed from step {saved[0]} to step {last}")
EOF

# ---- (b) 3 steps sharded against 3 under DDP, from the same model.ckpt and seed
for parallel in ddp shard; do
  shard=false; if [ $parallel = shard ]; then shard=true; fi
  row "three_$parallel" 180 "${train[@]}" --workers=0 --steps=3 --shard=$shard --out_dir="$out/$parallel"
done
row shard_vs_ddp 30 "$python" - "$out/ddp/log.jsonl" "$out/shard/log.jsonl" <<'EOF'
import json, sys
ddp, shard = ([json.loads(line) for line in open(path) if '"loss"' in line] for path in sys.argv[1:])
assert [r["step"] for r in ddp] == [r["step"] for r in shard] == [1, 2, 3], "both runs log steps 1 to 3"
print(f"{'step':>4} {'loss ddp':>12} {'loss shard':>12} {'grad_norm ddp':>14} {'grad_norm shard':>16}")
for a, b in zip(ddp, shard):
    print(f"{a['step']:4d} {a['loss']:12.6g} {b['loss']:12.6g} {a['grad_norm']:14.6g} {b['grad_norm']:16.6g}")
EOF

# ---- (c) the README's GPU rows, and the vc2 step under the profiler
# VideoCrafter2's text encoder, random weights; the byte encoder if open_clip is not installed. ViT-H-14's text tower
# is built at full size (350 M weights), minutes on a CPU, and the toy run's U-Net is not its match: bytes there too
text_encoder=openclip
if [ "${SMALL:-0}" = 1 ] || ! "$python" -c "import open_clip" 2>/dev/null; then text_encoder=bytes; fi
step=(--size $size --batch $batch --frames $frames --latent $latent --dtype bf16 --checkpointing)
row train 140 "$python" -m tools.bench "${step[@]}" "${timed[@]}" "${counted[@]}" --json "$out/train.json"
if [ "${SMALL:-0}" != 1 ]; then  # a CPU profile says nothing of the GPU's kernels
  row profile 140 "$python" -m tools.profile_step "$out" "${step[@]}" --warmup 1
fi
row sample 140 "$python" -m tools.bench --what sample --size $size --frames $frames --latent $latent --dtype $sample_dtype \
  --text-encoder $text_encoder --ddim-steps $ddim --warmup 1 --steps 2 --flops none --json "$out/sample.json"
row heatmap 60 "$python" -m tools.bench --what heatmap --size $image --frames $frames --raft "$raft" --json "$out/heatmap.json"
for parallel in ddp shard; do  # one rank each: the per-rank state and step time of DDP against FSDP2
  row "states_$parallel" 100 "$python" -m torch.distributed.run --standalone --nproc_per_node 1 -m tools.memory \
    --what states --size $size \
    --frames $frames --latent $latent --batch 2 --dtype bf16 --parallel $parallel "${timed[@]:2}" --out "$out"
done
exit $failed

"""Optical flow -> motion heatmaps, the weights of MotiF's motion focal loss.

Where it sits: a clip of T frames becomes a heatmap m (T, H, W) in [0, 1] that is ~1 where things move and ~0 where
they do not, by one of three roads through this file: demo/shapes.py's synthetic clips from their exact flow; a video
folder's clips from RAFT, once into a cache (data.py heatmaps, read back by data.py) or inside the training step
(train.py, clip_heatmaps). loss.py area-downsamples m to the latent size and weights the diffusion loss with it.

    frames (T, 3, H, W) --RAFT--> flow (T, 2, H, W), pixels: the motion of each frame's own pixels, where they
          are in that frame: to the next frame, and for the last frame to the one before (backward flow)
          --> x = |flow| / width            relative motion, independent of the resolution
          --> sigma(x) = 1 / (1 + exp(100 (0.05 - x)))      per-frame motion heatmaps (T, H, W)
          --> frame i: max of its own and frame i-1's (the pixels frame i-1's content leaves)      m (T, H, W)

The last frame's backward flow is what puts its heatmap where the object is in it: the forward flow into it lies on
frame T-2, where the object was a frame earlier. It costs one RAFT pair more per clip (T pairs instead of T-1).
Real videos take the cheap road to the same place (RAFT.heatmaps): RAFT runs on the frames resized
to a short side of 128 px, the smallest it takes (a 320x512 pair costs 6x fewer FLOPs than at full
size), and the pair heatmaps are area-averaged at once to 1/8 of the frame size (the kl-f8 latent's),
since loss.py averages them to the latent size anyway. The synthetic shapes videos know their exact flow and skip RAFT, not the rest.
The commands that cache a folder's heatmaps and show a video's are in data.py (`heatmaps`, `show`).

Contents, in order: flow -> heatmaps; RAFT; the motion monitor (are the samples going static? the same RAFT ->
heatmap road measures validation samples against their real clips, for train.py's validation pass).
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F

MOTION_THRESHOLD = 0.05   # relative motion (fraction of the width per frame) where sigma = 0.5
MOTION_SHARPNESS = 100.0  # slope of sigma: 0.0067 at no motion, 0.993 at 0.1 widths per frame
RAFT_MIN_SIDE = 128       # RAFT sees frames at least this big (small ones are upsampled)
RAFT_MULTIPLE = 8         # and padded to a multiple of this
RAFT_CPU_CHUNK = 8        # frame pairs per RAFT call on the CPU
RAFT_GPU_CHUNK = 64       # on a GPU (halved on out-of-memory): not yet measured on one

# ---- flow -> heatmaps ----


def sigma(x):
    """1 / (1 + exp(100 (0.05 - x))), elementwise: polarises relative motion to ~0 or ~1."""
    return torch.sigmoid(MOTION_SHARPNESS * (x - MOTION_THRESHOLD))


def pair_heatmaps(flow, width=None):
    """flow (..., 2, H, W) in pixels -> heatmaps (..., H, W) of the frame pairs.

    width: the width in pixels of the frames the flow was computed on (default: the flow's)."""
    width = width or flow.shape[-1]
    return sigma(flow.norm(dim=-3) / width)                        # (..., H, W)


def frame_heatmaps(motion):
    """Per-frame motion heatmaps (..., T, H, W) -> the frame heatmaps m (..., T, H, W).

    motion[i] is sigma of the motion of frame i's pixels, laid where they are in frame i (flow out of it; for the
    last frame the backward flow into it). Frame i takes the max of motion[i] and motion[i-1]: where its content
    moves and where frame i-1's content moved away from, since the pixels it vacates change too. sigma is monotonic,
    so this is sigma of the larger motion."""
    previous = torch.cat([motion[..., :1, :, :], motion[..., :-1, :, :]], dim=-3)   # (..., T, H, W)
    return torch.maximum(motion, previous)


def heatmap_from_flow(flow, width=None):
    """flow (T, 2, H, W) in pixels, each frame's own motion (clip_pairs) -> heatmap m (T, H, W) in [0, 1]."""
    return frame_heatmaps(pair_heatmaps(flow, width))


def clip_pairs(frames):
    """frames (..., T, C, H, W) -> the frame pairs (first, second), each (..., T, C, H, W), whose flow is each frame's
    own motion: (i, i+1) for i < T-1, and (T-1, T-2) for the last frame."""
    first = torch.cat([frames[..., :-1, :, :, :], frames[..., -1:, :, :, :]], dim=-4)
    second = torch.cat([frames[..., 1:, :, :, :], frames[..., -2:-1, :, :, :]], dim=-4)
    return first, second


# ---- RAFT ----


def load_raft_model(weights):
    """torchvision's raft_small / raft_large with its own pretrained weights ("small", "large"),
    or with a state dict file of either (which one is found from the file). torchvision is imported here, not at the
    top: its import is slow, and only runs on real videos need RAFT."""
    from torchvision.models.optical_flow import Raft_Large_Weights, Raft_Small_Weights, raft_large, raft_small
    if weights in ("small", "large"):
        build, pretrained = (raft_small, Raft_Small_Weights) if weights == "small" else (raft_large, Raft_Large_Weights)
        try:   # torchvision downloads them once into its cache; an offline machine needs a file instead
            return build(weights=pretrained.DEFAULT)
        except OSError as error:   # URLError and the socket's errors are OSErrors
            raise ValueError(f"cannot download torchvision's RAFT-{weights} weights ({error}); pass a state dict file "
                             f"instead of {weights!r} (data.py --weights, train.py --flow_weights / "
                             "--monitor_weights)") from None
    path = Path(weights)
    if not path.is_file():
        raise ValueError(f"RAFT weights must be 'small', 'large' or a state dict file; {weights} is none")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:      # torch.load raises many types for a file that is not a checkpoint
        raise ValueError(f"cannot read RAFT weights {path}: {str(error).splitlines()[0]}") from None
    for build in (raft_small, raft_large):
        model = build()
        try:
            model.load_state_dict(state)
            return model
        except (RuntimeError, TypeError, AttributeError):
            continue
    raise ValueError(f"{path} is neither a torchvision raft_small nor a raft_large state dict")


class RAFT:
    """Frozen RAFT (fp32, eval, no grad): frames in [-1, 1] -> optical flow in pixels.

    Pairs go through RAFT `chunk` at a time: by default 8 on the CPU (more buys nothing there) and 64 on a GPU (a
    pair at the 128 px short side needs tens of MB, so a micro-batch's 120 pairs take two calls, not fifteen). If a
    chunk runs out of GPU memory it is halved, for that call and every later one."""

    def __init__(self, weights="small", device="cpu", chunk=None):
        self.device = torch.device(device)
        self.chunk = chunk or (RAFT_GPU_CHUNK if self.device.type == "cuda" else RAFT_CPU_CHUNK)
        self.model = load_raft_model(weights).to(self.device).eval().requires_grad_(False)

    def flow(self, first, second):
        """RAFT's final flow of padded frame pairs (n, 3, h, w) -> (n, 2, h, w), chunk pairs per call."""
        while True:
            try:
                return torch.cat([self.model(first[i:i + self.chunk], second[i:i + self.chunk])[-1]
                                  for i in range(0, len(first), self.chunk)])
            except torch.cuda.OutOfMemoryError:
                if self.chunk == 1:
                    raise
                self.chunk //= 2
                torch.cuda.empty_cache()

    @torch.no_grad()
    def pairs(self, first, second):
        """Flow from first to second, both (N, 3, H, W) in [-1, 1] -> (N, 2, H, W) in pixels.

        Frames whose smaller side is under 128 px are upsampled (bilinear) for RAFT and the flow
        is scaled back (area average, values divided by the factor); all are padded to a multiple
        of 8 by repeating the border."""
        height, width = first.shape[-2:]
        scale = max(1.0, RAFT_MIN_SIDE / min(height, width))
        run_height, run_width = round(height * scale), round(width * scale)
        pad = (0, -run_width % RAFT_MULTIPLE, 0, -run_height % RAFT_MULTIPLE)
        images = [images.to(self.device, torch.float32) for images in (first, second)]
        if scale > 1:
            images = [F.interpolate(x, size=(run_height, run_width), mode="bilinear", align_corners=False)
                      for x in images]                                         # (N, 3, h, w)
        images = [F.pad(x, pad, mode="replicate") for x in images]             # (N, 3, h+, w+)
        flow = self.flow(*images)[..., :run_height, :run_width]               # (N, 2, h, w)
        if scale > 1:
            flow = F.interpolate(flow, size=(height, width), mode="area")      # (N, 2, H, W)
            flow = flow * torch.tensor([width / run_width, height / run_height], device=flow.device).view(1, 2, 1, 1)
        return flow.to(first.device)                                           # (N, 2, H, W)

    @torch.no_grad()
    def heatmaps(self, first, second, size):
        """Pair heatmaps (N, h, w) at size = (h, w) of frame pairs (N, 3, H, W) in [-1, 1]: RAFT on the frames resized
        so that their short side is 128 (the aspect kept), pair_heatmaps relative to that width, area-averaged to size."""
        height, width = first.shape[-2:]
        scale = RAFT_MIN_SIDE / min(height, width)
        run_size = [round(height * scale), round(width * scale)]
        first, second = (F.interpolate(x.float(), size=run_size, mode="bilinear", antialias=scale < 1, align_corners=False)
                         for x in (first, second))                            # (N, 3, 128, w')
        pairs = pair_heatmaps(self.pairs(first, second))                      # (N, 128, w')
        return F.interpolate(pairs[:, None], size=tuple(size), mode="area")[:, 0]  # (N, h, w)

    def __call__(self, frames):
        """frames (T, 3, H, W) in [-1, 1] -> flow (T, 2, H, W), each frame's own motion (clip_pairs)."""
        return self.pairs(*clip_pairs(frames))


def clip_heatmaps(raft, videos, size):
    """A batch of clips (B, 3, T, H, W) in [-1, 1] -> their motion heatmaps (B, T, h, w) at size, through
    RAFT.heatmaps: what train.py computes inside the step for video folders without a heatmap cache."""
    b, _, t, height, width = videos.shape
    first, second = clip_pairs(videos.transpose(1, 2))                         # (B, T, 3, H, W) each
    motion = raft.heatmaps(first.reshape(-1, 3, height, width), second.reshape(-1, 3, height, width), size)  # (B T, h, w)
    return frame_heatmaps(motion.view(b, t, *size))                            # (B, T, h, w)


def video_heatmap(frames, raft):
    """frames (T, 3, H, W) in [-1, 1] -> motion heatmap (T, H, W) through RAFT."""
    return heatmap_from_flow(raft(frames))


# ---- the motion monitor: are the samples going static? ----
# train.py's validation pass on a video folder samples the first frames of a few videos (told their captions and the
# fps of their real clips) and hands the samples and the real clips here. Both go through the same RAFT -> heatmap
# code that weights the loss, and the pass logs:
#
#     motion ratio        mean |flow| of the samples / mean |flow| of their real clips       (1: as much motion)
#     static-sample rate  samples whose mean |flow| is under STATIC_FRACTION of their own real clip's
#     moving area         mean heatmap m of the samples, and of the real clips              (MotiF's own measure)
#     dynamic degree      VBench's: the share of samples with enough frame pairs whose largest flows pass a
#                         size-scaled threshold (docs/motion-monitor.md: where ours differs from VBench's)
#
# The drift users report from every image-to-video trainer ("the motion amplitude decreased after training") shows
# as a falling motion ratio, so a pass warns (WARN_RATIO) when the ratio is under half the real clips' motion, or
# under half of what the first pass measured (at most 1: a model that starts from noise flickers more than its data
# moves, and losing that is no drift). Nothing here is random and nothing touches training's random streams: the
# losses of a run are the same bit for bit with the monitor on or off.

STATIC_FRACTION = 0.25  # a sample with under a quarter of its real clip's motion is a static sample
WARN_RATIO = 0.5        # warn when the samples move less than half as much as their real clips
VBENCH_TOP = 0.05       # VBench: a pair's motion is the mean of its 5 % largest flow magnitudes (pixels)


def load_monitor_raft(weights, device):
    """RAFT for the monitor, built without touching the global random stream (a fresh torchvision RAFT draws its
    initial weights from it before the state dict replaces them)."""
    with torch.random.fork_rng(devices=[]):
        return RAFT(weights, device=device)


@torch.no_grad()
def clip_motion(raft, videos, fps):
    """videos (N, 3, T, H, W) in [-1, 1], fps (N,) the rate each is played at -> per clip (N,) each:
    "flow", the mean |flow| per frame pair as a fraction of the width (flow.py's x, before sigma);
    "moving_area", the mean of its heatmap m; "dynamic", VBench's dynamic-degree decision (1.0 or 0.0)."""
    n, _, t, height, width = videos.shape
    first, second = clip_pairs(videos.transpose(1, 2))                                # (N, T, 3, H, W) each
    flow = raft.pairs(first.reshape(-1, 3, height, width),
                      second.reshape(-1, 3, height, width)).view(n, t, 2, height, width)
    heatmap = frame_heatmaps(pair_heatmaps(flow, width))                              # (N, T, H, W)
    magnitude = flow[:, :-1].norm(dim=2)                       # (N, T-1, H, W) pixels: VBench's forward pairs
    top = magnitude.flatten(2).topk(max(1, int(height * width * VBENCH_TOP)), dim=-1).values.mean(-1)  # (N, T-1)
    factor = torch.clamp(8.0 / torch.as_tensor(fps, dtype=torch.float32), min=1.0)    # (N,)
    threshold = factor * 6.0 * min(height, width) / 256                               # (N,) pixels
    count = round(4 * t / 16)
    dynamic = ((top > threshold[:, None]).sum(1) >= count).float()                    # (N,)
    return {"flow": magnitude.mean((1, 2, 3)) / width, "moving_area": heatmap.mean((1, 2, 3)), "dynamic": dynamic}


def motion_figures(sample, real):
    """clip_motion of the samples and of their real clips (same order) -> the pass's figures."""
    static = (sample["flow"] < STATIC_FRACTION * real["flow"]).float()
    return {"motion_ratio": (sample["flow"].sum() / real["flow"].sum().clamp(min=1e-12)).item(),
            "static_sample_rate": static.mean().item(),
            "sample_moving_area": sample["moving_area"].mean().item(),
            "real_moving_area": real["moving_area"].mean().item(),
            "dynamic_degree": sample["dynamic"].mean().item(),
            "real_dynamic_degree": real["dynamic"].mean().item()}


def first_logged_ratio(log):
    """The motion ratio of the first validation pass in a run's log.jsonl (None without one): what a resumed run
    compares its passes with."""
    for line in log.read_text().splitlines() if log.is_file() else []:
        try:
            return json.loads(line)["validation"]["motion_ratio"]
        except (ValueError, KeyError, TypeError):  # a loss line, or a line a killed run left half written
            continue
    return None


class MotionMonitor:
    """Scores each validation pass and remembers the first pass's ratio (or a resumed run's, given), for the warning."""

    def __init__(self, raft, first_ratio=None):
        self.raft, self.first_ratio = raft, first_ratio

    def __call__(self, samples, reals, fps):
        """samples, reals (N, 3, T, H, W) in [-1, 1], fps (N,) -> (figures, a warning line or None)."""
        figures = motion_figures(clip_motion(self.raft, samples, fps), clip_motion(self.raft, reals, fps))
        ratio = figures["motion_ratio"]
        if self.first_ratio is None:
            self.first_ratio = ratio
        why = []
        if ratio < WARN_RATIO:
            why.append(f"under {WARN_RATIO:g} of the real clips' motion")
        if ratio < 0.5 * min(self.first_ratio, 1.0):  # more motion than the data's is no standard to keep
            why.append(f"under half the first pass's {min(self.first_ratio, 1.0):.2f}")
        warning = None
        if why:
            warning = (f"warning: the samples are going static: motion ratio {ratio:.2f} ({' and '.join(why)}); "
                       f"{figures['static_sample_rate']:.0%} of them move under {STATIC_FRACTION:g} of their clip")
        return figures, warning

"""Are the samples going static? The motion of validation samples against the real clips they came from.

Where it sits: train.py's validation pass on a video folder samples the first frames of a few videos
(told their captions and the fps of their real clips) and hands the samples and the real clips here.
Both go through the same RAFT -> heatmap code that weights the loss (flow.py), and the pass logs:

    motion ratio        mean |flow| of the samples / mean |flow| of their real clips       (1: as much motion)
    static-sample rate  samples whose mean |flow| is under STATIC_FRACTION of their own real clip's
    moving area         mean heatmap m of the samples, and of the real clips              (MotiF's own measure)
    dynamic degree      VBench's: the share of samples with enough frame pairs whose largest flows pass a
                        size-scaled threshold (docs/motion-monitor.md: where ours differs from VBench's)

The drift users report from every image-to-video trainer ("the motion amplitude decreased after
training") shows as a falling motion ratio, so a pass warns (WARN_RATIO) when the ratio is under half the
real clips' motion, or under half of what the first pass measured (at most 1: a model that starts from noise
flickers more than its data moves, and losing that is no drift). Nothing here is random and nothing
touches training's random streams: the losses of a run are the same bit for bit with the monitor on or off.
"""
import json

import torch

from flow import RAFT, clip_pairs, frame_heatmaps, pair_heatmaps

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

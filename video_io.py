"""Video files, read a clip at a time and written: what data.py, sample.py and eval.py need of FFmpeg (PyAV).

Where it sits: data.py reads training clips through VideoFile (only the frames of a clip are decoded, from the key
frame before the first, in codecs whose key frames are intra-coded; other formats from the start); samples and
strips are written by write_video (mp4 or looping gif, atomically). A video that cannot give a clip raises
UnusableVideo with a short reason, which data.py counts and skips. Frames are uint8 (T, H, W, 3) here; the models
take float32 in [-1, 1] (to_unit_range, frames_to_tensor).
"""
import math
from pathlib import Path

import av
import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F

from utils import write_atomically

FALLBACK_FPS = 30.0     # when neither the caption row nor the container says


class UnusableVideo(Exception):
    """A video that cannot give a clip; reason is one of a few short categories."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}{f' ({detail})' if detail else ''}")
        self.reason = reason


# Codecs whose key frames are intra-coded: decoding from a key frame gives the frames that decoding from the start
# gives. Other formats (gif, animated png, ...) draw each frame over the previous ones and are decoded from the start.
SEEKABLE_CODECS = {"h264", "hevc", "av1", "vp8", "vp9", "mpeg4", "mpeg1video", "mpeg2video"}


def unreadable(error):
    """UnusableVideo("unreadable") with the first line of whatever a demuxer or decoder raised."""
    return UnusableVideo("unreadable", str(error).splitlines()[0] if str(error) else type(error).__name__)


class VideoFile:
    """A video file, read the way a training clip needs it: the frame count and fps from its packets (no
    decoding), then just the frames asked for, decoded from the key frame before the first of them.

        video = VideoFile(path)                  # UnusableVideo if it cannot give frames
        clip = video.read(range(40, 56, 2))      # uint8 (8, H, W, 3)

    Frame k is the k-th frame a decoder outputs when it decodes the whole file (presentation order), with any
    container FFmpeg reads (mp4, webm, gif, animated png ...); grey, palette and RGBA frames become RGB (alpha is
    dropped). Frames are found by their timestamps, so variable frame rates seek right; files whose codec cannot
    start at a key frame (SEEKABLE_CODECS), or whose packets lack distinct timestamps, are decoded from the start,
    stopping after the last frame asked for. Any failure is an UnusableVideo with a short reason."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UnusableVideo("missing file")
        if self.path.stat().st_size == 0:
            raise UnusableVideo("empty file")
        try:
            with av.open(str(self.path)) as container:
                if not container.streams.video:
                    raise UnusableVideo("no video stream")
                stream = container.streams.video[0]
                packets = [(packet.pts, packet.is_keyframe) for packet in container.demux(stream)
                           if packet.size and not packet.is_discard]            # what the decoder will output
                codec, rate = stream.codec_context.name, stream.average_rate or stream.guessed_rate
        except UnusableVideo:
            raise
        except Exception as error:       # demuxers raise many types for a corrupt file
            raise unreadable(error) from None
        fps = float(rate) if rate else None
        self.fps = fps if fps and math.isfinite(fps) and fps > 0 else None
        self.num_frames = len(packets)
        pts = [p for p, _ in packets]
        seekable = codec in SEEKABLE_CODECS and None not in pts and len(set(pts)) == len(pts)
        self.timestamps = sorted(pts) if seekable else None                         # frame k's pts
        self.frame_of = {t: k for k, t in enumerate(self.timestamps)} if seekable else None
        self.key_frames = sorted(p for p, key in packets if key) if seekable else []   # their pts

    def read(self, picked):
        """The frames picked (increasing frame numbers < num_frames) -> uint8 (len(picked), H, W, 3)."""
        picked = list(picked)
        if not picked:
            raise ValueError("read needs at least one frame number")
        seek_to = self.key_frame_before(picked[0])
        try:
            frames = self.decode(picked, seek_to)
            if frames is None:           # seeking missed a frame: decode from the start instead
                frames = self.decode(picked, None)
        except UnusableVideo:
            raise
        except Exception as error:       # decoders raise many types for a corrupt file
            raise unreadable(error) from None
        missing = [k for k in picked if k not in frames]
        if missing:
            raise UnusableVideo("unreadable", f"frame {missing[0]} of {self.num_frames} does not decode")
        return np.stack([frames[k] for k in picked])                               # (T, H, W, 3)

    def key_frame_before(self, k):
        """The timestamp of the last key frame at or before frame k, or None: decode from the start (a codec that
        cannot seek, or frame k is in the first group of pictures)."""
        if self.timestamps is None:
            return None
        before = [pts for pts in self.key_frames if pts <= self.timestamps[k]]
        return before[-1] if len(before) > 1 else None

    def decode(self, picked, seek_to):
        """{k: uint8 (H, W, 3)} for the frames k in picked that decode, from the start (seek_to None: frames counted)
        or from seek_to (a key frame's timestamp: frames known by their timestamps; None unless all are found)."""
        wanted, frames = set(picked), {}
        with av.open(str(self.path)) as container:
            stream = container.streams.video[0]
            if seek_to is not None:
                # the first packet first: decoders keep what it says (FFmpeg's H.264 decoder reads the x264 version
                # there, to work around old x264 bugs; without it a 4:4:4 clip decodes to green after a seek)
                stream.codec_context.decode(next(packet for packet in container.demux(stream) if packet.size))
                container.seek(seek_to, stream=stream, backward=True)
            for count, frame in enumerate(container.decode(stream)):
                k = count if seek_to is None else self.frame_of.get(frame.pts, -1)
                if k in wanted:
                    frames[k] = frame.to_ndarray(format="rgb24")                   # (H, W, 3)
                if k >= picked[-1]:
                    break
        return frames if seek_to is None or len(frames) == len(wanted) else None


def load_frames(path, min_frames=1):
    """Every frame of a video: (uint8 (N, H, W, 3), fps or None), or UnusableVideo with a short reason: missing
    file, empty file, no video stream, unreadable (not a video, truncated, corrupt, a codec FFmpeg cannot decode),
    no frames, too short (fewer than min_frames)."""
    video = VideoFile(path)
    if video.num_frames == 0:
        raise UnusableVideo("no frames")
    if video.num_frames < min_frames:
        raise UnusableVideo("too short", f"{video.num_frames} frames < {min_frames}")
    return video.read(range(video.num_frames)), video.fps


def write_video(path, frames, fps):
    """Write uint8 frames (T, H, W, 3) atomically as .gif (looping) or .mp4 (H.264, odd sizes padded)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".gif":
        encoded = iio.imwrite("<bytes>", frames, extension=".gif", plugin="pillow", duration=1000 / fps, loop=0)
    elif suffix == ".mp4":
        frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)))
        encoded = iio.imwrite("<bytes>", frames, extension=".mp4", plugin="pyav", codec="libx264", fps=fps)
    else:
        raise ValueError(f"cannot write {path}: use a .mp4 or .gif file name")
    write_atomically(path, lambda file: file.write(encoded))


def resize_center_crop(frames, size):
    """Resize uint8 frames (N, H, W, 3) to cover size = (h, w), then crop the centre: (N, h, w, 3)."""
    height, width = frames.shape[1:3]
    scale = max(size[0] / height, size[1] / width)
    cover = [max(size[0], round(height * scale)), max(size[1], round(width * scale))]
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)                              # (N, 3, H, W)
    video = F.interpolate(video, size=cover, mode="bilinear", antialias=True)        # (N, 3, H', W'): uint8 stays uint8
    top, left = round((cover[0] - size[0]) / 2), round((cover[1] - size[1]) / 2)
    video = video[:, :, top:top + size[0], left:left + size[1]]                      # (N, 3, h, w)
    return video.permute(0, 2, 3, 1).numpy()                                          # (N, h, w, 3)


def frames_to_clip(frames):
    """uint8 frames (T, H, W, 3) -> a dataset item's uint8 clip (3, T, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)


def to_unit_range(video):
    """uint8 pixels (any shape, on any device) -> float32 in [-1, 1], the range the models use."""
    return video.float() / 127.5 - 1


def frames_to_tensor(frames):
    """uint8 frames (T, H, W, 3) -> float32 (T, 3, H, W) in [-1, 1]."""
    return to_unit_range(torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2))

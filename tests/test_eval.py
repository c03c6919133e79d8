"""eval.py's scorer tells ground truth, static and reversed-motion clips apart."""
import numpy as np

from data import held_out_pairs, render_clip
from eval import copy_first_frame, ground_truth, judge, score, track

REVERSE = {"left": "right", "right": "left", "up": "down", "down": "up", "still": "still"}


def test_held_out_set_is_large_and_varied():
    entries = held_out_pairs(64)
    assert len(entries) >= 200 and len({e["image_id"] for e in entries}) >= 50
    motions = {m for e in entries for m in e["motions"].values()}
    assert motions == {"left", "right", "up", "down", "still"}
    assert any(len(e["motions"]) == 2 and len(set(e["motions"].values())) == 2 for e in entries)
    assert any(len(e["scene"]["objects"]) > len(e["motions"]) for e in entries)  # a distractor


def test_scorer_separates_ground_truth_static_and_reversed():
    entries = held_out_pairs(20)
    truth = score(entries, ground_truth(entries, 8))
    static = score(entries, copy_first_frame(entries, 8))
    reversed_ = score(entries, [render_clip(e["scene"], {i: REVERSE[m] for i, m in e["motions"].items()}, 8)[0]
                                for e in entries])
    assert truth["direction_accuracy"] >= 0.95 and truth["still_accuracy"] >= 0.95 and truth["static_video_rate"] == 0
    assert static["direction_accuracy"] == 0 and static["static_video_rate"] == 1
    assert reversed_["direction_accuracy"] <= 0.1  # (a reversed move with no room stays at the edge)
    # the paper's point: an image-alignment score prefers the video that does not move
    assert static["image_alignment_psnr"] > truth["image_alignment_psnr"]


def test_track_and_judge_by_hand():
    video = np.zeros((3, 32, 32, 3), np.uint8)
    for t, x in enumerate((4, 10, 16)):
        video[t, 10:14, x:x + 4] = (220, 50, 50)
    centres = track(video, (220, 50, 50))
    assert np.allclose(centres[:, 0], [5.5, 11.5, 17.5]) and np.allclose(centres[:, 1], 11.5)
    assert judge(centres[-1] - centres[0], "right", 32) and not judge(centres[-1] - centres[0], "left", 32)
    assert not judge(centres[-1] - centres[0], "still", 32)
    assert not judge(np.array([np.nan, np.nan]), "right", 32)  # a shape that vanished did not move right
    assert judge(np.array([0.5, -0.5]), "still", 32)

"""demo/shapes.py: the demo's synthetic videos: determinism, captions that match the motion, heatmaps, strides, the
held-out split."""
import re

import numpy as np
import pytest
import torch

from demo import shapes

PHRASE_TO_MOTION = {phrase: motion for motion, phrase in shapes.PHRASES.items()}


def uint8_frames(item):
    """An item's video back to uint8 (T, H, W, 3), exactly as rendered."""
    return item["video"].permute(1, 2, 3, 0).numpy()


def colour_mask(frames, colour):
    return (frames == np.array(shapes.PALETTE[colour], dtype=np.uint8)).all(-1)   # (..., H, W)


def centroid(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def named_motions(caption):
    """'the red circle moves left and the blue square stays still' -> {'red': 'left', 'blue': 'still'}."""
    found = re.findall(r"the (\w+) (?:circle|square|triangle) (moves \w+|stays still)", caption)
    assert len(found) == caption.count("the "), caption
    return {colour: PHRASE_TO_MOTION[phrase] for colour, phrase in found}


def moving(caption):
    """What a caption sets in motion: {(colour, motion)}; the shapes it does not name stay still."""
    return {(colour, motion) for colour, motion in named_motions(caption).items() if motion != "still"}


def test_a_shapes_item_is_a_pure_function_of_seed_split_and_index():
    dataset = shapes.ShapesDataset("train", seed=0)
    first = dataset[5]
    assert first["video"].dtype == torch.uint8 and first["video"].shape == (3, 8, 32, 32)
    assert first["heatmap"].dtype == torch.float32 and first["heatmap"].shape == (8, 32, 32)
    assert 0 <= first["heatmap"].min() and first["heatmap"].max() <= 1
    assert isinstance(first["caption"], str) and first["fps"].dtype == torch.float32 and first["fps"].ndim == 0
    _ = dataset[3]
    torch.manual_seed(123)                                  # global RNGs play no part
    np.random.seed(123)
    for again in (dataset[5], shapes.ShapesDataset("train", seed=0)[5]):
        assert all(torch.equal(first[k], again[k]) for k in ("video", "heatmap", "fps"))
        assert first["caption"] == again["caption"]
    for other in (shapes.ShapesDataset("train", seed=1)[5], shapes.ShapesDataset("test", seed=0)[5]):
        assert not torch.equal(first["video"][:, 0], other["video"][:, 0])


def test_four_consecutive_items_share_a_first_frame_with_different_captions():
    dataset = shapes.ShapesDataset("train", seed=0)
    distinct = []
    for scene in range(40):
        items = [dataset[4 * scene + j] for j in range(4)]
        assert all(torch.equal(items[0]["video"][:, 0], item["video"][:, 0]) for item in items)
        assert not torch.equal(items[0]["video"][:, 0], dataset[4 * scene + 4]["video"][:, 0])
        distinct.append(len({item["caption"] for item in items}))
        for a in items:                      # captions asking for different motion: different videos
            for b in items:
                if moving(a["caption"]) != moving(b["caption"]) and a["fps"] == b["fps"]:
                    assert not torch.equal(a["video"], b["video"])
    assert min(distinct) >= 2 and np.mean(distinct) > 2.5   # captions are drawn independently: some repeat


def test_the_caption_says_how_the_shapes_move_and_the_heatmap_shows_it():
    """Track each shape by its colour: named ones move the way the caption says, the others stay.
    A shape can pass under a later-drawn one, so it is followed while it is fully visible."""
    dataset, size = shapes.ShapesDataset("train", seed=0), 32
    checked_to_the_end = total = 0
    for index in range(120):
        item = dataset[index]
        frames, heatmap = uint8_frames(item), item["heatmap"].numpy()       # (T, H, W, 3), (T, H, W)
        motions = named_motions(item["caption"])
        present = [colour for colour in shapes.PALETTE if colour_mask(frames[0], colour).any()]
        assert set(motions) <= set(present)
        background = ~np.any([colour_mask(frames[0], colour) for colour in present], axis=0)  # (H, W)
        assert heatmap[0][background].max() < 0.01                          # sigma(0) = 0.0067
        for colour in present:
            motion = motions.get(colour, "still")
            masks = colour_mask(frames, colour)                             # (T, H, W)
            visible = [t for t in range(len(frames)) if masks[t].sum() >= 0.9 * masks[0].sum()]
            last = visible[-1]
            shift = centroid(masks[last]) - centroid(masks[0])              # (2,) pixels
            along = shift @ np.array(shapes.DIRECTIONS[motion])
            across = shift @ np.array(shapes.DIRECTIONS[motion][::-1])
            total += 1
            checked_to_the_end += last == len(frames) - 1
            if motion == "still":
                assert np.abs(shift).max() < 0.6, (index, colour, item["caption"], shift)
                assert heatmap[0][masks[0]].max() < 0.01
            else:
                assert across < 1.0 and along >= min(2.0 * last, 0.2 * size) - 0.5, (index, colour, shift)
                assert heatmap[0][masks[0]].min() > 0.98                    # sigma(3 / 32) = 0.988
    assert checked_to_the_end > 0.8 * total


def test_the_frame_stride_sets_the_fps_and_the_motion_per_frame():
    dataset = shapes.ShapesDataset("train", size=64, max_stride=3, base_fps=12, speed=1 / 32)   # 2 px per frame x stride
    strides = set()
    for index in range(60):
        item = dataset[index]
        stride = 12 / item["fps"].item()
        assert stride in (1, 2, 3)
        strides.add(stride)
        frames, motions = uint8_frames(item), named_motions(item["caption"])
        for colour, motion in motions.items():
            if motion != "still":
                masks = colour_mask(frames[:2], colour)                     # (2, H, W)
                if masks[1].sum() >= 0.9 * masks[0].sum():
                    shift = (centroid(masks[1]) - centroid(masks[0])) @ np.array(shapes.DIRECTIONS[motion])
                    assert shift == pytest.approx(2 * stride, abs=0.75), (index, shift, stride)
    assert strides == {1, 2, 3}


def test_held_out_pairs_are_fixed_and_their_images_are_never_training_first_frames():
    held_out = shapes.held_out_pairs()
    again = shapes.held_out_pairs()
    assert [(e["image_id"], e["caption"], e["motions"]) for e in held_out] == \
           [(e["image_id"], e["caption"], e["motions"]) for e in again]
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(held_out, again))
    images = {e["image"].tobytes() for e in held_out}
    assert len(images) == 64
    for image_id in range(64):
        prompts = [e["caption"] for e in held_out if e["image_id"] == image_id]
        assert 3 <= len(prompts) == len(set(prompts)) <= 5
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # thousands of tiny items: on a busy CPU, thread hand-offs would dominate
    try:
        for seed, scenes in ((0, 2500), (shapes.HELD_OUT_SEED, 500)):
            dataset = shapes.ShapesDataset("train", frames=2, seed=seed)
            first_frames = {uint8_frames(dataset[4 * scene])[0].tobytes() for scene in range(scenes)}
            assert len(first_frames) == scenes and not first_frames & images
    finally:
        torch.set_num_threads(threads)

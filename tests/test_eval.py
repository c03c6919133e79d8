"""demo/bench.py's scorer tells ground truth, static and reversed-motion clips apart."""
from dataclasses import asdict

import numpy as np
import pytest
import torch

import train
from data import frames_to_tensor
from demo.bench import (FIGURES, PROBE_TIMESTEPS, copy_first_frame, denoise_probe, ground_truth, held_out, judge, pool,
                        score, tally, text_sensitivity, track)
from demo.shapes import PALETTE, held_out_pairs, render_clip
from demo.unet import DEMO
from model import ModelConfig, MotifModel
from sample import build_model

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
    # the shapes against the clip the prompt describes: exact for the truth, far off for not moving or moving back
    assert truth["shape_psnr"] == pytest.approx(68.13, abs=0.01)
    assert static["shape_psnr"] < 20 and reversed_["shape_psnr"] < 20
    # what a moving shape leaves where it started: nothing in the truth, the whole shape in a copy of frame 0
    assert truth["ghost"] == 0 and static["ghost"] > 40


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


def two_prompts_per_image(entries):
    """The first two prompts of each first frame."""
    firsts = {}
    for entry in entries:
        firsts.setdefault(entry["image_id"], []).append(entry)
    return [e for pair in firsts.values() for e in pair[:2]]


def test_new_figures_ground_truth_static_reversed_and_wrong_prompt():
    entries = held_out_pairs(20)
    truth = score(entries, ground_truth(entries, 8))
    static = score(entries, copy_first_frame(entries, 8))
    reversed_ = score(entries, [render_clip(e["scene"], {i: REVERSE[m] for i, m in e["motions"].items()}, 8)[0]
                                for e in entries])
    assert truth["contrast_pairs"] == static["contrast_pairs"] > 100
    assert truth["text_contrast_accuracy"] >= 0.95 and truth["shape_integrity"] >= 0.9  # occlusion: < 1
    assert all(v >= 0.95 for v in truth["direction_accuracy_by_shapes"].values())
    assert set(truth["direction_accuracy_by_direction"]) == {"left", "right", "up", "down"}
    assert static["text_contrast_accuracy"] == 0 and static["shape_integrity"] == 1
    assert reversed_["text_contrast_accuracy"] <= 0.1
    # right motion, wrong prompt: each image's two clips swapped, so each moves as the other prompt asks
    pairs = two_prompts_per_image(entries)
    clips = ground_truth(pairs, 8)
    swapped = [clips[i + 1 - 2 * (i % 2)] for i in range(len(pairs))]
    assert score(pairs, clips)["text_contrast_accuracy"] >= 0.95
    assert score(pairs, swapped)["text_contrast_accuracy"] == 0  # moving well is not following the text


def test_shape_integrity_catches_dissolving_shapes_and_foreign_colours():
    entry = next(e for e in held_out_pairs(6) if len(e["scene"]["objects"]) == 1)
    video = ground_truth([entry], 8)[0]
    assert score([entry], [video])["shape_integrity"] == 1
    smeared = video.copy()
    smeared[1:] = video[1:] // 2 + np.roll(video[1:], 5, axis=2) // 2  # the shape smeared into the background
    assert score([entry], [smeared])["shape_integrity"] == 0
    assert score([entry], [smeared])["shape_psnr"] < 30
    copy = score([entry], copy_first_frame([entry], 8))["ghost"]
    assert 0 < score([entry], [smeared])["ghost"] < copy  # half the shape left behind, half its colour moved
    ghosted = video.copy()
    ghosted[1:] = video[1:] // 2 + video[:1] // 2  # the right clip blended half and half with its first frame
    assert score([entry], [ghosted])["ghost"] == pytest.approx(copy / 2, rel=0.05)  # half the copy's ghost
    foreign = video.copy()
    colour = next(c for c in PALETTE if c != entry["scene"]["objects"][0]["colour"])
    foreign[4, :2, :2] = PALETTE[colour]  # 4 pixels of a colour the first frame lacks
    assert score([entry], [foreign])["shape_integrity"] == 0
    foreign[4, 0, 0] = video[4, 0, 0]  # 3 pixels are noise, not a colour
    assert score([entry], [foreign])["shape_integrity"] == 1


def test_figures_pool_over_any_set_of_images():
    """score() is pool() over the images' tallies; a subset of images pools to that subset's score."""
    entries = held_out_pairs(12)
    videos = copy_first_frame(entries, 8)[:20] + ground_truth(entries, 8)[20:]  # some right, some static
    tallies = tally(entries, videos)
    assert sorted(tallies) == list(range(12))
    whole, pooled = score(entries, videos), pool(tallies.values())
    assert all(whole[k] == pytest.approx(pooled[k]) for k in FIGURES)
    first = [i for i, e in enumerate(entries) if e["image_id"] < 5]
    part = score([entries[i] for i in first], [videos[i] for i in first])
    assert all(part[k] == pytest.approx(pool([tallies[i] for i in range(5)])[k]) for k in FIGURES)
    assert pool([tallies[0], tallies[0]]) == pytest.approx(pool([tallies[0]]))  # a resampled image counts twice


def test_text_sensitivity_sees_whether_the_model_reads_the_direction():
    """A fresh model's text path is zero-initialised (the transformers' proj_out): no prompt changes v_hat. Once the
    text can reach the output, the direction words and the empty prompt change it."""

    torch.manual_seed(0)
    cfg = asdict(train.load_config(["--preset", "shapes", "--height=16", "--width=16"]))
    model = build_model(ModelConfig.from_run_config(cfg)).eval()
    for p in model.unet.out.parameters():  # an output, still without a path from the text
        torch.nn.init.normal_(p, std=0.05)
    fresh = text_sensitivity(model, cfg, images=3)
    assert fresh["timesteps"] == [999, 900, 500] and max(fresh["direction_words"] + fresh["empty_prompt"]) == 0
    for name, p in model.named_parameters():
        if name.endswith("proj_out.weight"):
            torch.nn.init.normal_(p, std=0.05)
    reading = text_sensitivity(model, cfg, images=3)
    assert min(reading["direction_words"]) > 1e-4 and min(reading["empty_prompt"]) > 1e-4


def test_denoise_probe_scores_what_the_network_draws_in_one_step():
    """An oracle whose v_hat gives back the described clip scores as the truth at every t; one whose v_hat gives
    back the first frame held still scores as a copy of the first frame (the whole shape left behind)."""


    class Oracle(MotifModel):
        def denoise(self, z_t, z_img, t, context, fps):
            abar = self.schedule.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
            x0 = self.answer.repeat(2, 1, 1, 1, 1)  # (2N, C, T, h, w): the guided and the unguided half
            return (abar.sqrt() * z_t - x0) / (1 - abar).sqrt()  # the v that gives back x0 exactly

    cfg = asdict(train.load_config(["--preset", "shapes"]))
    model = Oracle(ModelConfig.from_run_config(cfg), DEMO).eval()
    entries = [e for e in held_out(cfg, 4) if set(e["motions"].values()) != {"still"}]
    truth = ground_truth(entries, cfg["frames"])
    model.answer = model.encode_video(torch.stack([frames_to_tensor(v).transpose(0, 1) for v in truth]))
    exact = denoise_probe(model, cfg, cfg_scale=2.0, images=4)
    assert exact["timesteps"] == list(PROBE_TIMESTEPS)
    assert min(exact["shape_psnr"]) > 50 and max(exact["ghost"]) < 1 and min(exact["first_frame_psnr"]) > 50
    copies = copy_first_frame(entries, cfg["frames"])
    model.answer = model.encode_video(torch.stack([frames_to_tensor(v).transpose(0, 1) for v in copies]))
    copied = denoise_probe(model, cfg, cfg_scale=2.0, images=4)
    baseline = score(entries, copies)
    assert copied["shape_psnr"] == pytest.approx([baseline["shape_psnr"]] * len(PROBE_TIMESTEPS), abs=0.5)
    assert copied["ghost"] == pytest.approx([baseline["ghost"]] * len(PROBE_TIMESTEPS), abs=1.0)
    assert min(copied["first_frame_psnr"]) > 50

"""Step choice by search: the ternary search finds the minimum of unimodal scores, evaluating each point once."""

import json
import math

import pytest

from callbacks import StepSearch
from cli import main
from cm_lightning import ConsistencyDistillationModule, DiffusionModule
from cm_lightning.core.karras import karras_sigmas
from cm_lightning.sampling.schedule_search import search_schedule, ternary_search
from tests.helpers import tiny, tiny_args


@pytest.mark.parametrize("minimum", [0, 1, 7, 19, 38, 39])
def test_ternary_search_finds_the_minimum_of_a_unimodal_score(minimum):
    calls = []

    def score(i):
        calls.append(i)
        return (i - minimum) ** 2 + 3.0

    best, seen = ternary_search(score, 0, 39)
    assert best == minimum and seen[best] == 3.0
    assert len(calls) == len(set(calls)) <= 16  # each point once, far fewer than the 40 of a full scan


def test_ternary_search_handles_plateaus_and_tiny_ranges():
    best, seen = ternary_search(lambda i: max(abs(i - 10), 3), 0, 30)  # flat bottom from 7 to 13
    assert 7 <= best <= 13 and seen[best] == 3
    assert ternary_search(lambda i: -i, 4, 4)[0] == 4
    assert ternary_search(lambda i: i, 2, 3)[0] == 2
    with pytest.raises(ValueError, match="empty search range"):
        ternary_search(lambda i: i, 3, 2)


def fid_like(target: float):
    """A unimodal stand-in for FID in log σ, lowest at σ = target."""
    return lambda schedule: 100 + 40 * (math.log(schedule[-1]) - math.log(target)) ** 2


def test_search_schedule_finds_the_grid_level_nearest_the_optimum_and_then_a_third_below_it():
    grid = karras_sigmas(40).tolist()
    schedule, score, scored = search_schedule(fid_like(1.3), steps=2)
    nearest = min(grid, key=lambda s: abs(math.log(s) - math.log(1.3)))
    assert schedule == [80.0, pytest.approx(nearest)] and score == pytest.approx(fid_like(1.3)(schedule))
    assert all(s[0] == 80.0 and len(s) == 2 for s in scored) and len(scored) < 20

    # greedy third level: the score of a three-level schedule depends on its last level here
    three, _, _ = search_schedule(lambda s: fid_like(1.3)(s) if len(s) == 2 else fid_like(0.2)(s), steps=3)
    assert three[:2] == schedule and three[2] == pytest.approx(min((g for g in grid if g < schedule[1]), key=lambda s: abs(math.log(s) - math.log(0.2))))


def test_bad_search_requests_are_refused():
    with pytest.raises(ValueError, match="steps >= 2"):
        search_schedule(fid_like(1.0), steps=1)
    with pytest.raises(ValueError, match="num_scales must exceed steps"):
        search_schedule(fid_like(1.0), steps=3, num_scales=3)


def test_a_search_on_a_given_grid_scores_only_its_levels():
    levels = karras_sigmas(18).flip(0).tolist()  # CD's training grid, σ_max first
    schedule, _, scored = search_schedule(fid_like(0.8), steps=3, grid=levels)
    assert all(s in levels for candidate in scored for s in candidate) and schedule[1] in levels
    with pytest.raises(ValueError, match="the grid must be decreasing"):
        search_schedule(fid_like(0.8), grid=[0.8, 80.0])


def test_step_search_takes_the_training_levels_of_a_model_that_has_them():
    cd = tiny(ConsistencyDistillationModule, num_scales=10)
    assert StepSearch().candidates(cd) == cd.training_levels() == karras_sigmas(10).flip(0).tolist()
    assert StepSearch(grid="free").candidates(cd) is None and StepSearch().candidates(tiny()) is None  # iCT: none
    with pytest.raises(ValueError, match="grid must be 'training' or 'free', got 'karras'"):
        StepSearch(grid="karras")


def test_step_search_refuses_a_diffusion_model_and_bad_settings():
    with pytest.raises(ValueError, match="a DiffusionModule is not a consistency model"):
        StepSearch().check_model(tiny(DiffusionModule))
    with pytest.raises(ValueError, match="steps must be >= 2"):
        StepSearch(steps=1)
    with pytest.raises(ValueError, match="0.8, 80.0"):  # an increasing baseline, refused in setup, before any work
        StepSearch(baseline=[0.8, 80.0]).check_model(tiny())


@pytest.mark.slow
def test_step_search_from_the_command_line_writes_a_schedule_that_predict_takes(trained_run, fake_mnist, tmp_path):
    out, ckpt = tmp_path / "search.json", trained_run / "checkpoints" / "last.ckpt"
    common = [*tiny_args(fake_mnist), "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={ckpt}"]
    main(["test", *common, "--trainer.callbacks+=callbacks.StepSearch", "--trainer.callbacks.num_samples=16",
          "--trainer.callbacks.num_scales=8", "--trainer.callbacks.batch_size=8", f"--trainer.callbacks.output={out}"])
    result = json.loads(out.read_text())
    schedule, grid = result["schedule"], karras_sigmas(8).tolist()
    assert schedule[0] == 80.0 and len(schedule) == 2 and any(abs(schedule[1] - g) < 1e-3 for g in grid[1:-1])
    assert result["fid"] == min(r["fid"] for r in result["scored"]) and len(result["scored"]) >= 3
    baseline = result["baseline"]  # [80, 0.8] on the same images: the found schedule's reference point
    assert baseline["schedule"] == [80.0, 0.8] and baseline["fid"] > 0
    main(["predict", *common, "--data.predict_num_samples=4", f"--writer.output_dir={tmp_path / 'samples'}",
          f"--model.predict_sampler={schedule}"])
    assert len(list((tmp_path / "samples").glob("*.png"))) == 4

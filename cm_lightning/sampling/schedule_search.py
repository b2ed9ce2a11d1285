"""Choosing the noise levels of few-step consistency sampling by search (as the reference code's ternary search).

Two-step sampling 80 → σ → 0 depends on the intermediate σ, and FID is unimodal enough in it for a
ternary search over a Karras grid; a third level can then be searched below the found one, greedily.
``ternary_search`` is the search over any score; ``search_schedule`` applies it to a score of sampler
schedules, e.g. ``fid_score`` (the FID machinery of the ``FID`` callback as a function).
"""

from collections.abc import Callable, Sequence

from cm_lightning.core.karras import SIGMA_MAX, SIGMA_MIN, karras_sigmas


def ternary_search(score: Callable[[int], float], low: int, high: int, on_score: Callable[[int, float], None] | None = None) -> tuple[int, dict[int, float]]:
    """The index in [low, high] minimising a unimodal ``score``, and every score evaluated (each once).

    Shrinks [low, high] by a third per round (dropping the side of the larger of the two inner points)
    until at most three indices are left, then takes the best of them.
    """
    if low > high:
        raise ValueError(f"empty search range [{low}, {high}]")
    seen: dict[int, float] = {}

    def value(i: int) -> float:
        if i not in seen:
            seen[i] = float(score(i))
            if on_score is not None:
                on_score(i, seen[i])
        return seen[i]

    while high - low > 2:
        m1, m2 = low + (high - low) // 3, high - (high - low) // 3
        if value(m1) < value(m2):  # the minimum lies left of m2
            high = m2 - 1
        elif value(m1) > value(m2):  # ... right of m1
            low = m1 + 1
        else:  # ... between them
            low, high = m1, m2
    best = min(range(low, high + 1), key=value)
    return best, seen


def search_schedule(
    score: Callable[[list[float]], float], steps: int = 2, num_scales: int = 40, sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX, rho: float = 7.0, on_score: Callable[[list[float], float], None] | None = None,
    grid: Sequence[float] | None = None,
) -> tuple[list[float], float, dict[tuple[float, ...], float]]:
    """The schedule [σ_max, σ_2, …] of ``steps`` levels minimising ``score``: each further level is a
    ternary search over the grid's levels strictly below the previous one, the earlier levels fixed
    (greedy). The grid is ``grid`` (descending, σ_max first: a method's training levels) or else the Karras
    grid of ``num_scales`` levels. Returns the schedule, its score and every schedule scored."""
    if steps < 2:
        raise ValueError(f"a search needs steps >= 2 (one step has nothing to choose), got {steps}")
    if grid is None:
        if num_scales < steps + 1:
            raise ValueError(f"num_scales must exceed steps ({steps}), got {num_scales}")
        grid = karras_sigmas(num_scales, sigma_min, sigma_max, rho).flip(0).tolist()  # decreasing: grid[0] = σ_max
    grid = [float(s) for s in grid]
    if len(grid) < steps + 1 or any(a <= b for a, b in zip(grid, grid[1:])):
        raise ValueError(f"the grid must be decreasing with more than steps ({steps}) levels, got {grid}")
    schedule, last, scored = [float(grid[0])], 0, {}
    best_score = float("nan")
    for _ in range(steps - 1):
        def trial(i: int, prefix=list(schedule)) -> float:
            candidate = prefix + [float(grid[i])]
            result = score(candidate)
            scored[tuple(candidate)] = result
            if on_score is not None:
                on_score(candidate, result)
            return result

        # the levels below the previous one, down to σ_min (excluded: a step to σ_min adds almost nothing)
        index, seen = ternary_search(trial, last + 1, len(grid) - 2)
        schedule.append(float(grid[index]))
        best_score, last = seen[index], index
    return schedule, best_score, scored

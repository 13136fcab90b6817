"""Spec seed000_part3 §1.5: the published laws' golden numbers, closed form vs brute force, properties."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llmlab.errors import UserError
from llmlab.scaling import PRESETS, twenty_tokens_rule

HOFF = PRESETS["chinchilla_hoffmann"]


@pytest.mark.parametrize("C,N,D,ratio,L", [
    (1e18, 8.058e7, 2.068e9, 25.7, 3.5353),
    (1e20, 6.449e8, 2.585e10, 40.1, 2.5998),
    (1e21, 1.824e9, 9.136e10, 50.1, 2.3289),
    (1e24, 4.130e10, 4.036e12, 97.7, 1.9112),
])
def test_golden_optimum_closed_form_and_brute_force(C, N, D, ratio, L):
    opt = HOFF.optimal(C)
    assert opt["n_params"] == pytest.approx(N, rel=1e-3) and opt["n_tokens"] == pytest.approx(D, rel=1e-3)
    assert opt["tokens_per_param"] == pytest.approx(ratio, abs=0.05) and opt["loss"] == pytest.approx(L, abs=1e-4)
    assert 6 * opt["n_params"] * opt["n_tokens"] == pytest.approx(C, rel=1e-12)
    assert HOFF.frontier_loss(C) == pytest.approx(opt["loss"], rel=1e-12)
    grid = np.logspace(6, 13, 200_000)  # brute force on C = 6 N D
    losses = HOFF.E + HOFF.A / grid**HOFF.alpha + HOFF.B / (C / (6 * grid)) ** HOFF.beta
    assert grid[losses.argmin()] == pytest.approx(opt["n_params"], rel=2e-4)


def test_constants_and_exponents():
    assert HOFF.G == pytest.approx(1.3447, abs=1e-4) and HOFF.K == pytest.approx(813.68, abs=0.01)
    assert HOFF.a == pytest.approx(0.4516, abs=1e-4) and HOFF.b == pytest.approx(0.5484, abs=1e-4)
    assert HOFF.frontier_exponent == pytest.approx(0.15355, abs=1e-5)
    bes = PRESETS["chinchilla_besiroglu"]
    assert bes.a == pytest.approx(0.5126, abs=1e-4)
    opt = bes.optimal(5.76e23)  # Epoch's refit: ~20 tokens per parameter
    assert opt["n_params"] == pytest.approx(72.3e9, rel=5e-3) and opt["n_tokens"] == pytest.approx(1.33e12, rel=5e-3)


def test_chinchilla_beats_gopher_at_about_the_same_compute():
    chinchilla, gopher = HOFF.loss(70e9, 1.4e12), HOFF.loss(280e9, 300e9)
    assert chinchilla == pytest.approx(1.9366, abs=1e-4) and gopher == pytest.approx(1.9933, abs=1e-4)
    assert chinchilla < gopher


@pytest.mark.parametrize("target,C,N,D", [(2.0, 1.11e23, 1.53e10, 1.21e12), (2.3, 1.35e21, None, None)])
def test_target_loss_inversion(target, C, N, D):
    c = HOFF.compute_for_loss(target)
    assert c == pytest.approx(C, rel=5e-3) and HOFF.optimal(c)["loss"] == pytest.approx(target, rel=1e-9)
    if N is not None:
        assert HOFF.optimal(c)["n_params"] == pytest.approx(N, rel=5e-3)
        assert HOFF.optimal(c)["n_tokens"] == pytest.approx(D, rel=5e-3)


def test_kaplan_in_flops():
    k = PRESETS["kaplan"]
    for C, L in ((1e18, 3.32), (1e21, 2.35), (1e24, 1.66)):
        assert k.loss_compute(C) == pytest.approx(L, abs=0.005)
        assert k.compute_for_loss(k.loss_compute(C)) == pytest.approx(C, rel=1e-9)
    opt = k.optimal(1e21)
    assert opt["n_params"] == pytest.approx(7.77e9, rel=5e-3) and opt["n_tokens"] == pytest.approx(3.87e10, rel=5e-3)


@pytest.mark.parametrize("N,FLOPs,D", [(400e6, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9),
                                      (67e9, 5.76e23, 1.5e12), (175e9, 3.85e24, 3.7e12), (280e9, 9.90e24, 5.9e12),
                                      (520e9, 3.43e25, 11.0e12), (1e12, 1.27e26, 21.2e12), (10e12, 1.30e28, 216.2e12)])
def test_table_3_of_the_paper_under_the_20_tokens_rule(N, FLOPs, D):
    assert 6 * N * D == pytest.approx(FLOPs, rel=0.05)  # the table obeys C = 6 N D (to its rounding: 1.5T is 4.7 %)
    rule = twenty_tokens_rule(FLOPs)  # the table's D/N drifts from 20 to ~22 (Approach 1's fit): N within 5 %
    assert rule["n_params"] == pytest.approx(N, rel=0.05) and rule["n_tokens"] == pytest.approx(D, rel=0.08)
    assert rule["n_tokens"] / rule["n_params"] == pytest.approx(20, rel=1e-12) and 6 * rule["n_params"] * rule["n_tokens"] == pytest.approx(FLOPs)


def test_properties_monotone_convex_and_grid_refinement():
    ns = np.logspace(7, 11, 9)
    assert all(HOFF.loss(a, 1e11) > HOFF.loss(b, 1e11) for a, b in zip(ns, ns[1:]))
    assert all(HOFF.loss(1e9, a) > HOFF.loss(1e9, b) for a, b in zip(ns, ns[1:]))
    assert all(HOFF.frontier_loss(a) > HOFF.frontier_loss(b) for a, b in zip(ns, ns[1:]))
    C = 1e24
    errors = []
    for points in (50, 500, 5000):  # the seed's 50-point grid is off by ~12 %
        grid = np.logspace(7, 12, points)
        losses = np.array([HOFF.loss(n, C / (6 * n)) for n in grid])
        second = np.diff(losses, 2)
        assert (second > 0).all() and 0 < losses.argmin() < points - 1  # convex in log N, interior minimum
        errors.append(abs(grid[losses.argmin()] / HOFF.optimal(C)["n_params"] - 1))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 2e-3


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, float("nan"), "1e20"])
def test_bad_budgets_are_one_line(bad):
    with pytest.raises(UserError, match="must be a positive finite number"):
        HOFF.optimal(bad)


def test_target_below_the_irreducible_loss():
    with pytest.raises(UserError, match=r"target_loss=1.5 is not above the irreducible loss E=1.69"):
        HOFF.compute_for_loss(1.5)

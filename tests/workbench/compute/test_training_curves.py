"""Readings of curves over training (workbench.compute.training_curves) on curves whose answer is known."""

from __future__ import annotations

import numpy as np

from workbench.compute.training_curves import first_step, grokking_phases, half_fall_step, steepest_change


def test_first_step_and_half_fall_step():
    steps = np.array([0, 10, 20, 30, 40])
    assert first_step(steps, np.array([0.1, 0.4, 0.6, 0.9, 1.0]) > 0.5) == 20
    assert first_step(steps, np.zeros(5, dtype=bool)) is None
    loss = np.exp(np.array([0.0, 2.0, 1.5, 0.9, 0.0]))  # peak log-loss 2 at step 10, half-way (1) by step 30
    assert half_fall_step(steps, loss, after=10) == 30
    assert half_fall_step(steps, loss, after=40) is None  # one step after: no fall to measure


def test_grokking_phases_from_a_log():
    steps = np.array([0, 100, 200, 300, 400, 500])
    train_acc = np.array([0.1, 1.0, 1.0, 1.0, 1.0, 1.0])
    test_acc = np.array([0.0, 0.1, 0.2, 0.7, 1.0, 1.0])
    test_loss = np.exp(np.array([3.0, 4.0, 4.0, 2.0, 0.1, 0.0]))  # 90% of the fall from log 2 (step 300): 0.2
    assert grokking_phases(steps, train_acc, test_acc, test_loss) == {
        "memorisation_end": 100, "circuit_formation_end": 300, "cleanup_end": 400}
    never = grokking_phases(steps, train_acc, np.zeros(6), test_loss)
    assert never == {"memorisation_end": 100, "circuit_formation_end": None, "cleanup_end": None}


def test_steepest_change_finds_the_jump_and_ignores_noise():
    steps = [0, 1, 3, 10, 100, 200, 300, 400, 500]
    rising = [0.02, 0.03, 0.01, 0.02, 0.02, 0.05, 0.5, 0.7, 0.72]
    assert steepest_change(steps, rising, min_change=0.3) == (200, 300)
    assert steepest_change(steps, [0.02, 0.021, 0.019] + [0.02] * 6, min_change=0.3) is None
    falling = [5.0, 5.0, 4.9, 4.8, 4.8, 4.7, 2.0, 1.7, 1.6]
    assert steepest_change(steps, falling, min_change=0.1, rising=False) == (200, 300)

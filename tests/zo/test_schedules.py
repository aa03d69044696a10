"""Query schedules: expected values are worked out by hand in the comments, not recomputed."""

import logging
import math

import pytest
from hydra.utils import instantiate

from adazeta.zo.schedules import AdaptiveSchedule, ConstantSchedule, LinearSchedule, QuerySchedule


def test_constant():
    s = ConstantSchedule(q=3)
    s.bind(steps_per_epoch=5, max_steps=50)
    assert [s(k) for k in (0, 7, 49)] == [3, 3, 3]
    assert ConstantSchedule()(0) == 1  # needs no bind
    assert isinstance(s, QuerySchedule)


def test_adaptive_formula_per_epoch():
    # Q = min(max(floor(2 * sqrt(e)), 1), 7), epochs from 0, 10 steps per epoch:
    # e=0: 0 -> 1 | e=1: 2 | e=2: 2.83 -> 2 | e=3: 3.46 -> 3 | e=4: 4 | e=9: 6 | e=16: 8 -> 7
    s = AdaptiveSchedule(alpha=2.0, beta=0.5, q_max=7)
    s.bind(steps_per_epoch=10, max_steps=1000)
    expected = {0: 1, 9: 1, 10: 2, 19: 2, 20: 2, 30: 3, 40: 4, 49: 4, 90: 6, 160: 7, 999: 7}
    assert {k: s(k) for k in expected} == expected


def test_adaptive_paper_defaults():
    # alpha 0.85, beta 0.45, q_max 20; one step per epoch so step == epoch.
    # e=1: 0.85 -> 1 | e=10: 0.85 * 10^0.45 = 0.85 * 2.818 = 2.40 -> 2
    # e=100: 0.85 * 10^0.9 = 0.85 * 7.943 = 6.75 -> 6 | e=1000: 0.85 * 10^1.35 = 19.03 -> 19
    # e=2000: 0.85 * 30.6 = 26 -> clamped to 20
    s = AdaptiveSchedule()
    s.bind(steps_per_epoch=1, max_steps=5000)
    assert [s(e) for e in (0, 1, 10, 100, 1000, 2000)] == [1, 1, 2, 6, 19, 20]


def test_adaptive_q_min_floors_the_paper_curve_without_reshaping_it():
    # The paper's curve (alpha 0.85, beta 0.45) is 1, 1, 2, 6, 19, 20 at e = 0, 1, 10, 100, 1000,
    # 2000; q_min = 2 lifts only the epochs below 2, and q_min = q_max pins Q.
    s = AdaptiveSchedule(q_min=2)
    s.bind(steps_per_epoch=1, max_steps=5000)
    assert [s(e) for e in (0, 1, 10, 100, 1000, 2000)] == [2, 2, 2, 6, 19, 20]
    pinned = AdaptiveSchedule(q_min=5, q_max=5)
    pinned.bind(steps_per_epoch=1, max_steps=10)
    assert {pinned(e) for e in range(10)} == {5}
    with pytest.raises(ValueError, match=r"q_min=6 is above q_max=5"):
        AdaptiveSchedule(q_min=6, q_max=5)


def test_the_shipped_adaptive_schedule_floors_q_at_2_and_the_paper_experiment_at_1():
    from conftest import compose_config

    default = instantiate(compose_config([], hydra_config=False).schedule)
    paper = instantiate(compose_config(["experiment=llama2_7b_adazeta"], hydra_config=False).schedule)
    for s in (default, paper):
        s.bind(steps_per_epoch=10, max_steps=100)
    assert (default(0), paper(0)) == (2, 1)


def released_q(epoch: int, max_steps: int, num_train: int, batch: int) -> int:
    """The released AdaZeta code's Q, transcribed (yifanycc/AdaZeta, large_models/run.py: inc_rate
    from NUM=20 and SHRINK=0.85; trainer_adazeta.py: the clamp, NUM_MAX=15)."""
    total_epoch = max_steps / (num_train / batch)
    inc_rate = math.log((1 / 0.85) * 20) / math.log(total_epoch)
    return min(max(int(0.85 * (epoch ** inc_rate)), 1), 15)


def test_adaptive_q_target_is_the_released_codes_schedule():
    # 160 epochs: beta = ln(20 / 0.85) / ln(160) = 3.1582 / 5.0752 = 0.6223
    # e=10: 0.85 * 10^0.6223 = 3.56 -> 3 | e=100: 0.85 * 17.56 = 14.93 -> 14 | e=101: 15.03 -> 15 (the cap)
    s = AdaptiveSchedule(alpha=0.85, q_max=15, q_min=1, q_target=20)
    s.bind(steps_per_epoch=1, max_steps=160)
    assert s.effective_beta == pytest.approx(0.6223, abs=1e-4)
    assert [s(e) for e in (0, 1, 10, 100, 101, 159)] == [1, 1, 3, 14, 15, 15]
    # Against the transcription, at a length whose epochs are whole batches in both loaders (992
    # examples at batch 16: 62 steps an epoch), over every epoch of Llama-2-7B's 10k steps.
    s.bind(steps_per_epoch=62, max_steps=10_000)
    assert [s(k) for k in range(0, 10_000, 62)] == [released_q(e, 10_000, 992, 16) for e in range(0, 10_000 // 62 + 1)]


def test_the_paper_experiment_runs_the_released_schedule_and_its_paper_twin_the_papers_text():
    from conftest import compose_config

    released = compose_config(["experiment=llama2_7b_adazeta"], hydra_config=False).schedule
    paper = compose_config(["experiment=llama2_7b_adazeta_paper"], hydra_config=False).schedule
    assert (released.q_target, released.q_max, released.q_min) == (20, 15, 1)
    assert (paper.q_target, paper.beta, paper.q_max, paper.q_min) == (None, 0.45, 20, 1)
    s = instantiate(released)
    s.bind(steps_per_epoch=62, max_steps=10_000)  # 1000 examples at batch 16 in our loader
    assert s.effective_beta == pytest.approx(math.log(20 / 0.85) / math.log(10_000 / 62))


def test_q_target_and_reach_max_are_one_choice():
    with pytest.raises(ValueError, match="set one of them"):
        AdaptiveSchedule(q_target=20, reach_max_at_last_epoch=True)


def test_adaptive_q_constant_within_an_epoch():
    s = AdaptiveSchedule(alpha=1.0, beta=1.0, q_max=100)  # Q = max(e, 1)
    s.bind(steps_per_epoch=4, max_steps=40)
    assert [s(k) for k in range(12)] == [1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2]


def test_adaptive_reach_max_at_last_epoch():
    # 95 steps of 10 per epoch -> epochs 0..9, E_last = 9; beta = log(20 / 0.85) / log(9) = 1.437
    # e=8: 0.85 * 8^1.437 = 0.85 * 19.86 = 16.9 -> 16 | e=9: 0.85 * 9^1.437 = 20 exactly
    s = AdaptiveSchedule(alpha=0.85, beta=0.45, q_max=20, reach_max_at_last_epoch=True)
    s.bind(steps_per_epoch=10, max_steps=95)
    assert s.effective_beta == pytest.approx(1.4373, abs=1e-4)
    assert s(0) == 1
    assert s(80) == 16
    assert s(90) == s(94) == 20
    qs = [s(k) for k in range(95)]
    assert qs == sorted(qs) and max(qs) == 20 and qs.index(20) == 90


def test_adaptive_reach_max_few_epochs(caplog):
    s = AdaptiveSchedule(q_max=8, reach_max_at_last_epoch=True)
    with caplog.at_level(logging.WARNING):
        s.bind(steps_per_epoch=10, max_steps=15)  # epochs 0 and 1
    assert "at least 3 epochs" in caplog.text
    assert [s(0), s(9), s(10), s(14)] == [1, 1, 8, 8]
    s.bind(steps_per_epoch=10, max_steps=10)  # a single epoch is the last epoch
    assert s(0) == 8


def test_adaptive_reach_max_when_alpha_exceeds_q_max():
    s = AdaptiveSchedule(alpha=30.0, q_max=5, reach_max_at_last_epoch=True)
    s.bind(steps_per_epoch=1, max_steps=10)
    assert s.effective_beta == 0.0
    assert [s(k) for k in range(10)] == [5] * 10


def test_linear_matches_mezo():
    # MeZO: max(1, int(step / max_steps * q_end)); q_end 4, 10 steps:
    # k: 0 1 2 3 4 5 6 7 8 9 -> 4k/10 = 0 .4 .8 1.2 1.6 2 2.4 2.8 3.2 3.6
    s = LinearSchedule(q_end=4)
    s.bind(steps_per_epoch=3, max_steps=10)
    assert [s(k) for k in range(10)] == [1, 1, 1, 1, 1, 2, 2, 2, 3, 3]
    s = LinearSchedule(q_start=2, q_end=4)
    s.bind(steps_per_epoch=3, max_steps=10)
    assert [s(k) for k in range(10)] == [2, 2, 2, 2, 2, 2, 2, 2, 3, 3]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ConstantSchedule(q=0), r"q=0"),
        (lambda: ConstantSchedule(q=1.5), r"q=1.5"),
        (lambda: AdaptiveSchedule(alpha=0), r"alpha=0"),
        (lambda: AdaptiveSchedule(alpha=-1.0), r"alpha=-1.0"),
        (lambda: AdaptiveSchedule(beta=-0.1), r"beta=-0.1"),
        (lambda: AdaptiveSchedule(q_max=0), r"q_max=0"),
        (lambda: AdaptiveSchedule(reach_max_at_last_epoch="yes"), r"reach_max_at_last_epoch"),
        (lambda: LinearSchedule(q_start=0, q_end=4), r"q_start=0"),
        (lambda: LinearSchedule(q_start=5, q_end=4), r"q_start=5, q_end=4"),
    ],
)
def test_validation_names_key_and_value(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_bind_and_step_validation():
    s = AdaptiveSchedule()
    with pytest.raises(RuntimeError, match=r"call bind\(steps_per_epoch, max_steps\)"):
        s(0)
    with pytest.raises(ValueError, match="steps_per_epoch=0"):
        s.bind(steps_per_epoch=0, max_steps=10)
    with pytest.raises(ValueError, match="max_steps=0"):
        s.bind(steps_per_epoch=1, max_steps=0)
    s.bind(steps_per_epoch=1, max_steps=10)
    with pytest.raises(ValueError, match="step=-1"):
        s(-1)
    with pytest.raises(RuntimeError, match="LinearSchedule is not bound"):
        LinearSchedule(q_end=3)(0)


@pytest.mark.parametrize(
    "node",
    [
        {"_target_": "adazeta.zo.schedules.ConstantSchedule", "q": 2},
        {
            "_target_": "adazeta.zo.schedules.AdaptiveSchedule",
            "alpha": 0.85,
            "beta": 0.45,
            "q_max": 20,
            "reach_max_at_last_epoch": False,
        },
        {"_target_": "adazeta.zo.schedules.LinearSchedule", "q_start": 1, "q_end": 16},
    ],
)
def test_hydra_instantiate(node):
    s = instantiate(node)
    s.bind(steps_per_epoch=10, max_steps=100)
    assert isinstance(s, QuerySchedule) and s(0) >= 1

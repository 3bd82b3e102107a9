"""The warm-up's length: through the annealing, with the end of the online stage left free."""

from companion.classify import schedule
from companion.params import validate_params


def _w(**kw):
    return schedule.warmup_iters(validate_params({"device": "cpu", **kw}))


def test_default_holds_through_the_annealing_but_frees_the_last_quarter():
    p = validate_params({"device": "cpu"})
    assert p.anneal_start + p.anneal_iters == 17 and p.online_iters == 20
    assert _w() == 15  # 20 online: the last 5 (a quarter) free
    assert _w(online_iters=40) == 17  # the annealing ends first
    assert _w(online_iters=40, anneal_iters=40) == 30


def test_short_schedules_keep_three_iterations_and_three_free():
    assert _w(online_iters=6, anneal_start=1, anneal_iters=4) == 3
    assert _w(online_iters=3) == 3
    for n in range(6, 60):
        assert n - _w(online_iters=n, anneal_iters=200) >= 3


def test_explicit_and_balanced():
    assert _w(warmup_iters=0) == 0 and _w(warmup_iters=7) == 7
    assert _w(balance="equal") == 0

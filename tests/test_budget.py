import pytest

from svdzip.budget import keep_budget, max_useful_rank, normalise_rank, ratio_from_kept, uniform_rank, unit_params
from svdzip.errors import SvdzipError


def test_papers_rank_formula():
    assert uniform_rank(4096, 4096, 0.2) == 1638
    assert uniform_rank(11008, 4096, 0.2) == 2388
    assert uniform_rank(1024, 4096, 0.2) == 655


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, float("nan")])
def test_ratio_outside_unit_interval_is_refused(bad):
    with pytest.raises(SvdzipError, match="ratio must be a fraction strictly between 0 and 1, got"):
        keep_budget(100, bad)
    with pytest.raises(SvdzipError, match="kept fraction must be strictly between 0 and 1, got"):
        ratio_from_kept(bad)


def test_kept_convention_converts():
    assert ratio_from_kept(0.8) == pytest.approx(0.2)


def test_rank_that_saves_nothing_means_dense():
    m, n = 30, 20
    k = max_useful_rank(m, n)
    assert unit_params(m, n, k) < m * n <= unit_params(m, n, k + 1)
    assert normalise_rank(m, n, k + 1) is None
    assert normalise_rank(m, n, 0) == 1

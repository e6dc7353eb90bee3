import numpy as np
import pytest

from opendit.eval.frechet import frechet_distance, frechet_distance_of


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)
    # diagonal (commuting) covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = 1.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(np.zeros(3), np.diag(a), np.array([1.0, 0, 0]), np.diag(b)) == pytest.approx(expected)
    # rotation invariance for non-commuting covariances
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    s1, s2 = A @ A.T, B @ B.T
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    d = frechet_distance(np.zeros(4), s1, np.ones(4), s2)
    assert frechet_distance(np.zeros(4), q @ s1 @ q.T, q @ np.ones(4), q @ s2 @ q.T) == pytest.approx(d, rel=1e-9)
    assert frechet_distance(np.ones(4), s1, np.ones(4), s1) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_of_samples_against_scipy():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(500, 6)), rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 0.3
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance_of(x, y) == pytest.approx(ref, rel=1e-8)

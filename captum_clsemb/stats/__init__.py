r"""Statistics for the paper's claims: significance tests, bootstrap intervals, FDR control.

All functions run on ``scipy.stats`` and take samples along axis 0, ``(N,)`` for one test
or ``(N, B)`` for one test per block (vectorised with ``axis=0``). Tests return a
:class:`TestResult`, intervals a :class:`ConfidenceInterval`; both have ``to_dict()`` for
JSON reports. Every resampling takes a ``seed``.

- :func:`wilcoxon_signed_rank`: trained versus random-init model per block (Fig. 2, Fig. 4a).
- :func:`permutation_test`: class- versus context-labelled tokens (Fig. 3a).
- :func:`mann_whitney_u`: key-value agreement of correctly versus incorrectly classified
  images (Sec. 6).
- :func:`paired_auc_test`, :func:`perturbation_auc_tests`: perturbation AUC against the
  random (Sec. 7) and linear-probe (Sec. 8) removal orders, paired per image.
- :func:`bootstrap_ci`, :func:`bootstrap_ratio_ci`: percentile bootstrap 95% intervals.
- :func:`benjamini_hochberg`: false discovery rate across blocks.
"""

from captum_clsemb.stats._results import (
    ConfidenceInterval,
    TestResult,
    benjamini_hochberg,
    significance_stars,
)
from captum_clsemb.stats.bootstrap import bootstrap_ci, bootstrap_ratio_ci
from captum_clsemb.stats.significance import (
    mann_whitney_u,
    paired_auc_test,
    permutation_test,
    perturbation_auc_tests,
    wilcoxon_signed_rank,
)

__all__ = [
    "TestResult",
    "ConfidenceInterval",
    "wilcoxon_signed_rank",
    "mann_whitney_u",
    "permutation_test",
    "paired_auc_test",
    "perturbation_auc_tests",
    "bootstrap_ci",
    "bootstrap_ratio_ci",
    "benjamini_hochberg",
    "significance_stars",
]

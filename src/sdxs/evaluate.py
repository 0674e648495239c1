"""Former home of `sdxs eval`, kept so that `from sdxs import evaluate` and `sdxs.evaluate.evaluate(...)` still
work: the evaluation is the package `sdxs.eval` now (one module per measurement, `sdxs.eval.report` for the
report). New code imports from `sdxs.eval`."""

from sdxs.eval import *  # noqa: F403
from sdxs.eval import __all__  # noqa: F401
from sdxs.eval.report import _interleave  # noqa: F401
from sdxs.grid import make_grid  # noqa: F401

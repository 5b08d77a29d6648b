"""Sweeps: run a grid of ``crasmra fit`` runs from one YAML file and report mean ± std over seeds.

A sweep file names a base fit config, the seeds, values every run gets, and one or more
*grids*. Each grid is a separate sub-grid (its own product of values, times the seeds), so
"variants x seeds", "delta x seeds" and "gamma x seeds" stay three small grids rather than one
product. Runs are identified by their complete overrides: a setting that several grids share
(e.g. the default CRA-SMRA run in the variant, delta and gamma grids) is trained once.

A grid that varies ``model.net.variant`` is also reported as paired differences against reference
variants (its ``compare_to``, default ``plain`` and ``baseline`` where the grid has them):
per seed, each variant minus the reference, with the mean and a 95% Student-t interval.

Layout of the output folder ``OUT``::

    OUT/sweep.yaml                      the sweep file as run (normalised)
    OUT/runs/<setting>/seed-<k>/        one crasmra run folder per (setting, seed)
    OUT/runs/<setting>/seed-<k>/sweep_run.json   the run's overrides, status and wall time
    OUT/runs/<setting>/seed-<k>/sweep_config.yaml  its whole fit config (`crasmra fit --config`)
    REPORT/results.md, results.json     tables (REPORT defaults to OUT)
    REPORT/plots/<grid>.png             accuracy against the grid's value, with error bars

A run counts as finished when its ``metrics.json`` has a ``test`` entry; finished runs are
skipped, and a run with a ``checkpoints/last.ckpt`` but no test result is resumed from it, so
a stopped sweep continues where it stopped.
"""

from crasmra.sweep.plan import *  # noqa: F403
from crasmra.sweep.report import *  # noqa: F403
from crasmra.sweep.run import *  # noqa: F403
from crasmra.sweep.spec import *  # noqa: F403

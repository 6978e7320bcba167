"""manymodels: train, promote and forecast one model per series, from a notebook or a script.

    >>> from manymodels import ManyModels
    >>> mm = ManyModels(keys=["store", "item"], time="date", target="sales", freq="W", horizon=8)
    >>> forecasts = mm.fit(sales).forecast()        # a DataFrame: keys, date, prediction, bounds, source

The same core as the ``manymodels`` command (``shared/``), over a workdir on disk (a temporary one
unless given): what the CLI's ``run`` and ``score`` produce from a file, this produces from a
DataFrame. Nixtla's long format (``unique_id``, ``ds``, ``y``) is read without naming columns.
"""
from __future__ import annotations

from manymodels.api import ManyModels
from shared import package_version

__all__ = ["ManyModels", "__version__"]

__version__ = package_version()

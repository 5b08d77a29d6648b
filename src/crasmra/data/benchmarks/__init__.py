"""Annotation readers of the four FGVC benchmarks in their official layouts.

Each reader takes the folder the archives were extracted into, finds the annotation files,
checks them against each other and against the official counts, and returns
:class:`~crasmra.data.base.Annotations`. What they share is in
:mod:`~crasmra.data.benchmarks.common` and :mod:`~crasmra.data.benchmarks.mat`.
"""

from __future__ import annotations

from collections.abc import Callable

from crasmra.data.base import Annotations
from crasmra.data.benchmarks.aircraft import AIRCRAFT_CLASS_COUNTS, AIRCRAFT_LEVELS, load_aircraft
from crasmra.data.benchmarks.cars import load_cars
from crasmra.data.benchmarks.common import LAYOUTS, OFFICIAL_COUNTS, URLS
from crasmra.data.benchmarks.cub import load_cub
from crasmra.data.benchmarks.dogs import load_dogs

__all__ = [
    "AIRCRAFT_CLASS_COUNTS",
    "AIRCRAFT_LEVELS",
    "BENCHMARKS",
    "LAYOUTS",
    "OFFICIAL_COUNTS",
    "URLS",
    "load_aircraft",
    "load_cars",
    "load_cub",
    "load_dogs",
]

BENCHMARKS: dict[str, Callable[..., Annotations]] = {
    "cub": load_cub,
    "aircraft": load_aircraft,
    "cars": load_cars,
    "dogs": load_dogs,
}

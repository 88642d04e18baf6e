"""sdg stage: synthetic queries for the corpus chunks. The front door is :mod:`embedtune.sdg.stage`
(``run_sdg``); generators plug in through :mod:`embedtune.sdg.base` and :mod:`embedtune.sdg.registry`, filters live in
:mod:`embedtune.sdg.filters`."""

from embedtune.sdg.base import Candidate, Generator, SdgError
from embedtune.sdg.registry import generator_names, get_generator, register_generator
from embedtune.sdg.stage import run_sdg

__all__ = ["Candidate", "Generator", "SdgError", "generator_names", "get_generator", "register_generator",
           "run_sdg"]

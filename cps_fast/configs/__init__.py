"""Presets: the CPS paper's 32 rows as one table and a rule (``paper.py``), plus the file ``demo.py``.

A table name (``<dataset>_<backbone>_1-<n>[_cutmix]``, e.g. ``voc_r50_1-8_cutmix``) is built
from its row by :func:`cps_fast.configs.paper.preset`; a preset file (``demo.py`` here, or a
user's own ``*.py``) is a handful of ``key = value`` assignments, read as text and executed,
not imported. Both sit over the defaults of :class:`cps_fast.config.Config`; load one with
:func:`cps_fast.config.load_preset` and list them with :func:`cps_fast.config.list_presets`.
docs/presets.md gives the source of every number.
"""

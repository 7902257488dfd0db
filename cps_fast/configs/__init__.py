"""Presets: one flat file per paper row (``<dataset>_<backbone>_1-<n>[_cutmix].py``) plus ``demo``.

A preset is a handful of ``key = value`` assignments over the defaults of
:class:`cps_fast.config.Config`; load one with :func:`cps_fast.config.load_preset`
and list them with :func:`cps_fast.config.list_presets`. The files are read as
text and executed, not imported (their names contain '-'). docs/presets.md gives
the source of every number.
"""

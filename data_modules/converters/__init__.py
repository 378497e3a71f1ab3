"""Converters from public data formats to the conversation JSONL schema (see DESIGN.md).

One module per format; each has ``NAME``, ``HELP``, ``add_arguments(parser)``,
``from_args(args)`` and a typed ``records(...)`` generator yielding ``Converted`` or
``BadRow`` items. ``data_modules.convert`` writes them (``mmfuse-convert``).
"""

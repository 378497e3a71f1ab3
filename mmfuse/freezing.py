"""Freezing by regular expressions per component, and the checks and table that go with it.

Components are the model's top-level parts: ``encoders.image``, ``encoders.audio``,
``encoders.text``, ``fusion``, ``conditioning`` and ``decoder``. The ``freeze`` config maps a
component to a rule; parameter names are relative to the component and are matched whole
(``re.fullmatch``)::

    freeze:
      encoders:
        image: {patterns: [".*"], except: ["proj\\\\..*"]}  # all but the projection
        audio: true                                         # shorthand: {patterns: [".*"]}
      decoder: {patterns: ["model\\\\.layers\\\\.[0-5]\\\\..*"]}  # the first six layers

Nested keys and dotted keys (``encoders.image:``) are the same component. A parameter is
frozen (``requires_grad`` False, so DDP ignores it) when a pattern matches its name and no
``except`` entry does; nothing is ever unfrozen here. Every pattern and exception must match
at least one parameter of its component (a typo fails loudly).

A component whose every parameter is frozen is *configured frozen*: at fit start it must
have no trainable parameter (LoRA adapters added to it are an error); every other component
*trains* and must have at least one (:func:`check_trainable`).

Frozen parts run in eval mode (no dropout, fixed BatchNorm statistics) whatever ``train()``
calls happen (:func:`frozen_units`, used by ``MMFuseModel.train``); an encoder with no
trainable parameter runs under ``torch.no_grad`` (``MMFuseModel.encode``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import nn

log = logging.getLogger(__name__)

KNOWN_COMPONENTS = (
    "encoders.image",
    "encoders.audio",
    "encoders.text",
    "fusion",
    "conditioning",
    "decoder",
)
_RULE_KEYS = {"patterns", "except"}


@dataclass(frozen=True)
class FreezeRule:
    """Which parameters of one component to freeze.

    Attributes:
        patterns: regular expressions (whole-name match) of parameters to freeze.
        exceptions: regular expressions of parameters the patterns must leave trainable.
    """

    patterns: tuple[str, ...] = (".*",)
    exceptions: tuple[str, ...] = ()


class ParamCount(NamedTuple):
    """One row of the parameter table."""

    component: str
    total: int
    trainable: int


def parse_component_tree(config: Mapping[str, Any] | None, is_leaf) -> dict[str, Any]:
    """Flattens ``{encoders: {image: X}, decoder: Y}`` (or ``{"encoders.image": X}``) into
    ``{"encoders.image": X, "decoder": Y}``, dropping null and false entries.

    ``is_leaf(value)`` tells a component's own settings from a level of nesting.
    """
    flat: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if value is None or value is False:
                continue
            if isinstance(value, Mapping) and not is_leaf(value):
                if not value:
                    continue
                walk(value, name + ".")
                continue
            if name in flat:
                raise ValueError(f"{name} is given twice (nested and dotted keys)")
            flat[name] = value

    walk(config or {}, "")
    return flat


def parse_freeze_config(config: Mapping[str, Any] | None) -> dict[str, FreezeRule]:
    """The ``freeze`` config as ``{component: FreezeRule}`` (see the module docstring).

    Raises:
        ValueError: an unknown key in a rule, or a value that is not ``true`` or a rule.
    """
    rules: dict[str, FreezeRule] = {}
    flat = parse_component_tree(config, lambda v: bool(set(v) & _RULE_KEYS))
    for component, value in flat.items():
        if value is True:
            rules[component] = FreezeRule()
            continue
        if not isinstance(value, Mapping):
            raise ValueError(
                f"freeze.{component}: expected true or {{patterns: [...], except: [...]}}, "
                f"got {value!r}"
            )
        unknown = set(value) - _RULE_KEYS
        if unknown:
            raise ValueError(f"freeze.{component}: unknown keys {sorted(unknown)}")
        patterns = value.get("patterns", (".*",))
        exceptions = value.get("except") or ()
        if isinstance(patterns, str) or isinstance(exceptions, str):
            raise ValueError(f"freeze.{component}: patterns and except are lists of regexes")
        rules[component] = FreezeRule(tuple(patterns), tuple(exceptions))
    return rules


def components(model: nn.Module) -> dict[str, nn.Module]:
    """The model's components: ``encoders.<name>`` for each encoder, then the other
    top-level children (``fusion``, ``decoder``, ``conditioning``, ...)."""
    parts: dict[str, nn.Module] = {}
    for name, child in model.named_children():
        if name == "encoders" and isinstance(child, nn.ModuleDict):
            parts.update({f"encoders.{key}": encoder for key, encoder in child.items()})
        else:
            parts[name] = child
    return parts


def apply_freezing(model: nn.Module, config: Mapping[str, Any] | None) -> list[str]:
    """Freezes the parameters the ``freeze`` config selects.

    A rule for a known component the model does not have (``encoders.text`` without a
    prompt encoder) is skipped with a warning, so presets compose with any model; an unknown
    component name is an error.

    The frozen parts (:func:`frozen_units`) are put in eval mode.

    Returns:
        The components configured frozen (every parameter frozen by its rule).

    Raises:
        ValueError: naming the component, for an unknown component, a bad regex or a
            pattern or exception that matches no parameter.
    """
    parts = components(model)
    frozen: list[str] = []
    for component, rule in parse_freeze_config(config).items():
        if component not in parts:
            if component in KNOWN_COMPONENTS:
                log.warning("freeze.%s: the model has no such component; skipped", component)
                continue
            raise ValueError(
                f"freeze.{component}: the model has no component {component!r}; "
                f"it has {sorted(parts)}"
            )
        params = dict(parts[component].named_parameters())
        patterns = _compiled(component, "patterns", rule.patterns, params)
        exceptions = _compiled(component, "except", rule.exceptions, params)
        selected = [
            name
            for name in params
            if any(p.fullmatch(name) for p in patterns)
            and not any(e.fullmatch(name) for e in exceptions)
        ]
        for name in selected:
            params[name].requires_grad_(False)
        if params and len(selected) == len(params):
            frozen.append(component)
        log.info(
            "freeze.%s: %d of %d parameter tensors frozen", component, len(selected), len(params)
        )
    for unit in frozen_units(model):  # from now on; MMFuseModel.train keeps them there
        unit.eval()
    return frozen


def _compiled(
    component: str, key: str, regexes: Iterable[str], params: Mapping[str, nn.Parameter]
) -> list[re.Pattern]:
    compiled = []
    for regex in regexes:
        try:
            pattern = re.compile(regex)
        except re.error as err:
            raise ValueError(f"freeze.{component}.{key}: bad regex {regex!r}: {err}") from err
        if not any(pattern.fullmatch(name) for name in params):
            examples = ", ".join(list(params)[:3])
            raise ValueError(
                f"freeze.{component}.{key}: {regex!r} matches no parameter of {component} "
                f"(names are relative to the component, e.g. {examples})"
            )
        compiled.append(pattern)
    return compiled


def parameter_table(model: nn.Module) -> list[ParamCount]:
    """Parameters per component (total and trainable), then ``other`` (parameters outside any
    component, if there are any) and ``total``. Shared parameters count once."""
    seen: set[int] = set()
    rows = []
    for component, module in components(model).items():
        rows.append(ParamCount(component, *_count(module.parameters(), seen)))
    other = _count(model.parameters(), seen)
    if other[0]:
        rows.append(ParamCount("other", *other))
    rows.append(ParamCount("total", sum(r.total for r in rows), sum(r.trainable for r in rows)))
    return rows


def _count(params: Iterable[nn.Parameter], seen: set[int]) -> tuple[int, int]:
    total = trainable = 0
    for param in params:
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return total, trainable


def format_table(rows: Iterable[ParamCount]) -> str:
    """The parameter table as aligned text."""
    rows = list(rows)
    width = max([len("component")] + [len(r.component) for r in rows])
    lines = [f"{'component':<{width}}  {'total':>12}  {'trainable':>12}"]
    lines += [f"{r.component:<{width}}  {r.total:>12,}  {r.trainable:>12,}" for r in rows]
    return "\n".join(lines)


def check_trainable(model: nn.Module, frozen: Iterable[str] = ()) -> list[ParamCount]:
    """Checks the end state: components in ``frozen`` have no trainable parameter, every
    other component has at least one.

    Returns:
        The parameter table (:func:`parameter_table`).

    Raises:
        ValueError: naming the component that breaks the rule.
    """
    frozen = set(frozen)
    parts = components(model)
    unknown = frozen - set(parts)
    if unknown:
        raise ValueError(f"frozen components {sorted(unknown)} are not in the model")
    rows = parameter_table(model)
    for row in rows:
        if row.component not in parts:
            continue
        if row.component in frozen and row.trainable:
            names = [n for n, p in parts[row.component].named_parameters() if p.requires_grad]
            raise ValueError(
                f"{row.component}: configured frozen (freeze.{row.component}) but "
                f"{row.trainable:,} of its parameters are trainable, e.g. {names[:3]} "
                "(LoRA on a frozen component?)"
            )
        if row.component not in frozen and not row.trainable:
            raise ValueError(
                f"{row.component}: set to train but none of its {row.total:,} parameters is "
                f"trainable; freeze it whole (freeze.{row.component}=true) or loosen its rule"
            )
    return rows


def has_trainable(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` requires a gradient."""
    return any(p.requires_grad for p in module.parameters())


def frozen_units(model: nn.Module) -> list[nn.Module]:
    """The frozen parts that must run in eval mode: each component with parameters, none
    trainable, and else each such direct child of an encoder (a frozen backbone under a
    trainable projection)."""
    units = []
    for name, module in components(model).items():
        if _all_frozen(module):
            units.append(module)
        elif name.startswith("encoders."):
            units.extend(child for child in module.children() if _all_frozen(child))
    return units


def _all_frozen(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)

"""Trigger payload schemas (JSON Schema), compiled once, with regular expressions in linear time.

``pattern`` and ``patternProperties`` run on RE2, whose matching time grows linearly with the
input, and so do the matches ``additionalProperties`` and ``unevaluatedProperties`` make against
``patternProperties``: a sender cannot make a schema check backtrack for seconds. ``uniqueItems``
is checked in linear time too. RE2 has no look-around and no
backreferences; a schema that uses them is refused at load (docs/configuration.md).

A check applies the schema to each part of the payload a bounded number of times, and takes a
bounded number of steps in all (:func:`first_error`): a recursive schema whose
``unevaluatedProperties`` checks each subtree once more at every level took time doubling with the
payload's depth (104 s at depth 20), and is stopped instead. Every subschema is checked by this
module's validators, with its own draft's keywords when it names a ``$schema`` (jsonschema's would
switch to that draft's stock class, without the limits or RE2). A schema that refers to itself
without descending into the payload (``{"$ref": "#"}``) is refused at load. No ``$ref`` is ever fetched: one that points
outside the schema cannot be resolved, and is refused at load when a probe reaches it, else the
event is refused (``schema_invalid``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from fractions import Fraction
from typing import Any

import attrs
import re2
from jsonschema import Draft202012Validator, ValidationError
from jsonschema import _legacy_keywords as jsonschema_legacy
from jsonschema import _utils as jsonschema_utils
from jsonschema.exceptions import SchemaError
from jsonschema.protocols import Validator
from jsonschema.validators import extend, validator_for
from referencing import Registry
from referencing.exceptions import Unresolvable

from bridge.errors import ConfigError

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # the error is raised (and reported with the trigger), not logged by RE2


@functools.lru_cache(maxsize=1024)
def _regex(pattern: str) -> Any:
    return re2.compile(pattern, _OPTIONS)


def _pattern(validator: Validator, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _regex(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(
    validator: Validator, properties: dict[str, Any], instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for index, (pattern, subschema) in enumerate(properties.items()):
        regex = _regex(pattern)
        for key, value in instance.items():
            if regex.search(key):
                # The pattern's place, not the pattern: the path goes back to the sender, and a
                # pattern may hold a value from the environment (see _QUOTES_THE_EVENT_ONLY).
                yield from validator.descend(value, subschema, path=key, schema_path=index)  # type: ignore[attr-defined]


class _LinearRe:
    """What jsonschema's ``_utils`` calls ``re`` for: ``additionalProperties`` and
    ``unevaluatedProperties`` match property names against ``patternProperties`` with
    ``re.search``, outside the keyword this module replaces. A key of 24 letters and a ``!``
    against ``^([a-z0-9]+-?)+$`` took 1.4 s there, and each more letter doubles it."""

    @staticmethod
    def search(pattern: str, string: str) -> Any:
        return _regex(pattern).search(string)


jsonschema_utils.re = _LinearRe  # type: ignore[attr-defined]
jsonschema_legacy.re = _LinearRe  # type: ignore[attr-defined]  # draft 2019-09's unevaluatedProperties


def _multiple_of(validator: Validator, step: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    """``multipleOf`` on the numbers as JSON wrote them: jsonschema divides floats, and
    ``0.07 / 0.01`` is ``7.000000000000001``, so an amount of 0.07, 0.29 or 19.99 was refused as no
    multiple of 0.01 (``schema_invalid``: a 422, a dead letter)."""
    if not validator.is_type(instance, "number") or isinstance(instance, bool):
        return
    quotient = _exact(instance) / _exact(step)
    if quotient.denominator != 1:
        yield ValidationError(f"{instance!r} is not a multiple of {step}")


def _exact(number: float | int) -> Fraction:
    """The number as written in decimal: a float by its shortest repr (0.1 is 1/10, not the binary
    fraction nearest to it)."""
    return Fraction(repr(number)) if isinstance(number, float) else Fraction(number)


def _unique_items(validator: Validator, unique: bool, instance: Any, schema: Any) -> Iterator[ValidationError]:
    """``uniqueItems`` in linear time: jsonschema's compares each item with every one before it
    when they do not sort (mixed types, objects), and 3,000 objects took 15 s."""
    if not unique or not validator.is_type(instance, "array"):
        return
    seen: set[Any] = set()
    for item in instance:
        key = _canonical(item)
        if key in seen:
            yield ValidationError(f"the array has non-unique elements ({len(instance)} items)")
            return
        seen.add(key)


def _canonical(value: Any) -> Any:
    """A hashable form of a JSON value, equal for values JSON Schema calls equal (``1`` and ``1.0``;
    not ``true`` and ``1``; objects whatever the order of their keys)."""
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, int | float):
        return ("n", value)
    if isinstance(value, list):
        return ("l", tuple(_canonical(v) for v in value))
    if isinstance(value, dict):
        return ("d", frozenset((k, _canonical(v)) for k, v in value.items()))
    return ("v", value)


# A check applies a schema (jsonschema's ``descend`` and ``iter_errors``) to each object or array
# of the payload at most this many times, or twice as many as the schema has subschemas when that
# is more: one visit per way the schema reaches it. A recursive schema that checks each subtree
# again at every level (``unevaluatedProperties`` beside an ``allOf`` that recurses, or ``anyOf``
# alternatives that all recurse) visits the deepest ones about 2**depth times: a tree 10 deep
# (0.2 s) is checked, one 11 deep is refused.
MAX_VISITS = 8192
# And at most this many in all, for all of an event's schemas together (about 0.6 s here): a part
# visited MAX_VISITS times may be a wide one. Checked on the adapter's event loop, 1,000,000 steps a
# schema (3 s, 8 s for three entries' schemas of one name) held every other request meanwhile.
MAX_STEPS = 200_000


class Steps:
    """What an event's checks may still spend (:data:`MAX_STEPS` to begin with): one for all of
    its triggers' schemas."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = MAX_STEPS


class Uncheckable(Exception):
    """A payload this schema cannot be checked against: its message says why, for the sender;
    ``detail`` (for the operator, at load) what it is about, which may quote the schema."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class SchemaTooCostly(Uncheckable):
    """A check applied the schema to one part of the payload, or in all, past its limits."""


class _Visits:
    __slots__ = ("limit", "seen", "steps")

    def __init__(self, limit: int, steps: Steps) -> None:
        self.limit = limit
        self.steps = steps
        self.seen: dict[int, int] = {}

    def visit(self, instance: Any) -> None:
        self.steps.left -= 1
        if self.steps.left < 0:
            raise SchemaTooCostly(f"its schemas are applied more than {MAX_STEPS} times in all")
        if isinstance(instance, dict | list):  # scalars are leaves: their visits follow these
            key = id(instance)  # the payload holds every one of them alive during the check
            count = self.seen.get(key, 0) + 1
            if count > self.limit:
                raise SchemaTooCostly(f"it applies the schema to one part of the payload more than {self.limit} times")
            self.seen[key] = count


_VISITS: ContextVar[_Visits | None] = ContextVar("schema_visits", default=None)


def _counted(method: Callable[..., Any]) -> Callable[..., Any]:
    def counted(self: Any, instance: Any, *args: Any, **kwargs: Any) -> Any:
        visits = _VISITS.get()
        if visits is not None:
            visits.visit(instance)
        return method(self, instance, *args, **kwargs)

    return counted


def _subschemas(node: Any) -> int:
    """How many objects and booleans ``node`` holds (an upper bound on its subschemas)."""
    count, stack = 0, [node]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            count += 1
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, bool):
            count += 1
    return count


def first_error(validator: Validator, payload: Any, steps: Steps | None = None) -> ValidationError | None:
    """The first error ``validator`` (made by :func:`compile_schema`) finds in ``payload``, or None;
    ``steps``: what the event's checks may still spend (spent here), else a budget of its own.

    Raises :class:`SchemaTooCostly` past its limits (see :data:`MAX_VISITS`), and
    :class:`Uncheckable` when the schema recurses without end for this payload's shape or names a
    ``$ref`` that cannot be resolved."""
    limit = getattr(validator, "_visit_limit", MAX_VISITS)
    token = _VISITS.set(_Visits(limit, steps or Steps()))
    try:
        return next(iter(validator.iter_errors(payload)), None)
    except RecursionError:
        raise Uncheckable("the schema refers to itself without end (a $ref cycle that never descends)") from None
    except Unresolvable as exc:
        raise Uncheckable("the schema has a $ref that cannot be resolved (none is fetched)", str(exc)) from None
    finally:
        _VISITS.reset(token)


# Values a schema that refers to itself without descending is tried on at load: such a schema
# recurses without end on every one of them, and on every payload.
_PROBES: tuple[Any, ...] = (None, True, 0, 0.5, "", [], {})


def _patterns(node: Any) -> Iterator[str]:
    """Every regular expression a schema holds (``pattern`` values, ``patternProperties`` keys)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str):
                yield value
            elif key == "patternProperties" and isinstance(value, dict):
                yield from value
            yield from _patterns(value)
    elif isinstance(node, list):
        for item in node:
            yield from _patterns(item)


def compile_schema(schema: dict[str, Any], where: str) -> Validator:
    """A validator for ``schema``; ConfigError naming ``where`` when it does not compile."""
    base = validator_for(schema, default=Draft202012Validator)
    try:
        base.check_schema(schema)
    except SchemaError as exc:
        path = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise ConfigError(f"{where}: schema does not compile at {path}: {exc.message}") from None
    for pattern in _patterns(schema):
        try:
            _regex(pattern)
        except re2.error as exc:
            why = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
            raise ConfigError(
                f"{where}: schema pattern {pattern!r} is not RE2 syntax (no look-around or backreferences): {why}"
            ) from None
    cls = _limited(base, max(MAX_VISITS, 2 * _subschemas(schema)), {})
    validator: Validator = cls(schema, registry=_NOTHING_FETCHED)
    for probe in _PROBES:
        try:
            first_error(validator, probe)
        except SchemaTooCostly:
            pass  # a costly shape, not an endless one: the event's own budget deals with it
        except Uncheckable as exc:
            raise ConfigError(f"{where}: {exc}" + (f": {exc.detail}" if exc.detail else "")) from None
    return validator


_KEYWORDS = {
    "pattern": _pattern,
    "patternProperties": _pattern_properties,
    "uniqueItems": _unique_items,
    "multipleOf": _multiple_of,
}


def _limited(draft: Any, limit: int, family: dict[Any, Any]) -> Any:
    """A class of its own (extend() makes one each time) of ``draft``'s validator, with this
    module's keywords and limits; ``family`` holds the classes of one compiled schema by draft."""
    cls = extend(draft, _KEYWORDS)  # type: ignore[no-untyped-call]
    cls.descend = _counted(cls.descend)
    cls.iter_errors = _counted(cls.iter_errors)
    cls.evolve = _evolve_in_family
    cls._visit_limit = limit
    cls._family = family
    family[draft] = cls
    return cls


def _evolve_in_family(self: Any, **changes: Any) -> Any:
    """jsonschema's ``evolve``, within this module's classes: jsonschema picks the stock class a
    subschema's ``$schema`` names, which has neither the limits nor RE2. A subschema naming another
    draft gets that draft's class of the family (its keywords: draft-07's ``dependencies``,
    2020-12's ``unevaluatedProperties``), with the same keywords of this module and limits."""
    own = type(self)
    schema = changes.setdefault("schema", self.schema)
    cls = own
    if isinstance(schema, dict) and "$schema" in schema:
        draft = validator_for(schema, default=own)  # own: a $schema it does not know
        if draft is not own and draft not in own._family.values():
            cls = own._family.get(draft) or _limited(draft, own._visit_limit, own._family)
    for field in attrs.fields(own):
        if field.init and field.alias not in changes:
            changes[field.alias] = getattr(self, field.name)
    return cls(**changes)


# A registry that fetches nothing: jsonschema's default fetches a remote $ref with urlopen, with
# no timeout, on the thread that checks the event.
_NOTHING_FETCHED: Registry[Any] = Registry()


# Keywords whose messages quote only the event's own values and the schema's shape (types, bounds,
# property names). The others (``const``, ``enum``, ``pattern``, ``not``, ``oneOf``, …) quote
# values the schema holds, which may have come from the environment at load: those are named, not
# quoted, as the message goes back to the event's sender.
_QUOTES_THE_EVENT_ONLY = frozenset(
    {
        "type",
        "required",
        "dependentRequired",
        "minLength",
        "maxLength",
        "minItems",
        "maxItems",
        "minProperties",
        "maxProperties",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "uniqueItems",
        "format",
        "anyOf",
        "contains",
        "minContains",
        "maxContains",
        "items",
        "prefixItems",
        "unevaluatedItems",
        "unevaluatedProperties",
        "additionalProperties",
    }
)


def described(error: ValidationError) -> str:
    """What a sender is told about ``error``: its message when that quotes nothing but the event,
    else where it is and which keyword refused it."""
    quotes_patterns = error.validator == "additionalProperties" and (
        not isinstance(error.schema, dict) or "patternProperties" in error.schema
    )
    if error.validator in _QUOTES_THE_EVENT_ONLY and not quotes_patterns:
        return error.message
    where = "/".join(str(p) for p in error.absolute_path) or "the payload"
    return f"{where} does not satisfy the schema's {error.validator!r} keyword"

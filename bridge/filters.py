"""CEL filters over an event (``name``, ``payload``, ``source``, ``metadata``, ``id``), within a budget.

The dispatcher evaluates filters while its workflow task waits (the EVALUATE_FILTERS local
activity), and the webhook adapter on its event loop, so their cost must not depend on what a
sender puts in a payload. Three things bound it, all counted in deterministic *units* (about
5-10 µs of work each; the same event always costs the same):

- only the parts of the event a filter names are converted to CEL values: ``payload.amount > 100``
  converts ``amount``, not a megabyte of ``items``; a filter that uses ``payload`` as a whole
  (``size(payload)``) converts all of it. Each converted node costs a unit; when there are more
  nodes than the filter's budget left, nothing is converted and the filter has run out.
- every evaluation step (a node of the expression, once per element inside a macro) costs a unit,
  and operators whose work grows with their operands (``==``, ``in``, ``+``, ``contains``,
  ``matches``, …) are charged by operand size. String repetition is refused.
- each filter may spend FILTER_BUDGET units on an event, and all of an event's filters together
  EVENT_BUDGET (one :class:`Scope` per event keeps the account). A filter that runs out does not
  match, and :meth:`Filter.evaluate` says so (None), so the caller can count it; once the event's
  budget is spent, its remaining filters are not evaluated.

A filter that fails at run time (a missing field, a type clash, an integer CEL cannot hold) does
not match. Integers from 2^63 to 2^64-1 (which the decoders accept) become CEL ``uint`` values.
The limits are described in docs/configuration.md, "Triggers".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import celpy
import lark
import re2
from celpy import celtypes
from celpy.evaluation import Activation, Evaluator, base_functions

from bridge.errors import BridgeError

log = logging.getLogger(__name__)
_ENV = celpy.Environment()

ROOTS = ("name", "payload", "source", "metadata", "id")
FILTER_BUDGET = 10_000  # units one filter may spend on one event
EVENT_BUDGET = 20_000  # units all of one event's filters may spend together
INT64 = (-(2**63), 2**63 - 1)
UINT64_MAX = 2**64 - 1

Path = tuple[str, ...]  # a root and the keys below it; the root alone means all of it


class FilterError(BridgeError):
    """A CEL expression that does not compile."""


class _Exhausted(BaseException):
    """A meter ran out. A BaseException, so that no ``except Exception`` inside celpy
    (one logs every argument at ERROR) turns it into a value or a megabyte-long log line."""


class Meter:
    """Units spent against a limit; deterministic, so a replay spends the same."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def charge(self, units: int) -> None:
        self.used += units
        if self.used > self.limit:
            raise _Exhausted


class Scope:
    """One event's values, converted for its filters on demand, and the budgets they spend.

    Each filter may spend ``budget`` units; all of the event's filters together ``total``.
    """

    def __init__(self, values: dict[str, Any], budget: int = FILTER_BUDGET, total: int = EVENT_BUDGET) -> None:
        self._values = values
        self.budget = budget
        self.spent = Meter(total)
        self._converted: dict[frozenset[Path], dict[str, Any]] = {}

    @property
    def cost(self) -> int:
        return self.spent.used

    @property
    def exhausted(self) -> bool:
        return self.spent.used >= self.spent.limit

    def meter(self) -> Meter:
        """A meter for one filter: its own budget, or what is left of the event's."""
        return Meter(min(self.budget, self.spent.limit - self.spent.used))

    def settle(self, meter: Meter) -> None:
        self.spent.used += min(meter.used, meter.limit)

    def bindings(self, needs: frozenset[Path], meter: Meter) -> dict[str, Any]:
        """The CEL values of the paths ``needs`` names (converted once per distinct set)."""
        cached = self._converted.get(needs)
        if cached is None:
            selected = {root: _select(self._values.get(root), sub) for root, sub in _trie(needs).items()}
            left = meter.limit - meter.used
            counted = _count_nodes(selected.values(), left)
            if counted > left:  # converting would run out of budget: only the counting is spent
                meter.charge(counted // _COUNTED_PER_UNIT)
                raise _Exhausted
            cached = {root: _to_cel(value, meter) for root, value in selected.items()}
            self._converted[needs] = cached
        return cached


def scope(
    name: str, payload: Any, source: str, metadata: dict[str, Any], event_id: str, *, budget: int = FILTER_BUDGET
) -> Scope:
    """The scope one event's filters are evaluated in; nothing is converted until a filter asks."""
    values = {"name": name, "payload": payload, "source": source, "metadata": metadata, "id": event_id}
    return Scope(values, budget, max(budget, EVENT_BUDGET))


def activation(
    name: str, payload: Any, source: str, metadata: dict[str, Any], event_id: str, *, budget: int = FILTER_BUDGET
) -> Scope:
    """:func:`scope`, refusing first (ValueError) an event with an integer outside CEL's signed
    64 bits anywhere in it: an adapter that wants a typed refusal instead of a non-match calls this."""
    stack: list[Any] = [payload, metadata]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, int) and not isinstance(value, bool) and not INT64[0] <= value <= INT64[1]:
            raise ValueError(f"the integer {str(value)[:30]} does not fit CEL's signed 64 bits")
    return scope(name, payload, source, metadata, event_id, budget=budget)


class Filter:
    """A compiled CEL expression, and the parts of an event it reads."""

    def __init__(self, source: str) -> None:
        self.source = source
        try:
            self._ast = _ENV.compile(source)
        except Exception as exc:
            raise FilterError(f"filter {source!r} does not compile: {exc}") from None
        self.needs = frozenset(_needs(self._ast))

    def matches(self, scope: Scope) -> bool:
        """True when the expression holds for the scope's event; False when it does not, when it
        fails, and when its budget ran out (:meth:`evaluate` tells that apart)."""
        return self.evaluate(scope) is True

    def evaluate(self, scope: Scope) -> bool | None:
        """Whether the expression holds (a failure is False), or None when the budget ran out."""
        if scope.exhausted:
            return None
        meter = scope.meter()
        try:
            values = scope.bindings(self.needs, meter)
            evaluator = _MeteredEvaluator(self._ast, _base_activation(meter), meter)
            result = evaluator.evaluate(values)
        except _Exhausted:
            log.debug("filter %r ran out of budget", self.source)
            return None
        except Exception as exc:
            log.debug("filter %r did not evaluate: %s", self.source, exc)
            return False
        finally:
            scope.settle(meter)
        return isinstance(result, bool | celtypes.BoolType) and bool(result)


class _MeteredEvaluator(Evaluator):
    """celpy's interpreter, charging one unit per expression node it visits, macros included."""

    def __init__(self, ast: lark.Tree[Any], activation: Activation, meter: Meter) -> None:
        super().__init__(ast, activation)
        self._meter = meter

    def _visit_tree(self, tree: lark.Tree[Any]) -> Any:  # lark's one entry for every child visited
        self._meter.charge(1)
        return super()._visit_tree(tree)

    def sub_evaluator(self, ast: lark.Tree[Any]) -> Evaluator:
        return _MeteredEvaluator(ast, self.activation, self._meter)

    def evaluate(self, context: Any = None) -> Any:
        self._meter.charge(2)  # each call copies the activation's names (once per macro element)
        return super().evaluate(context)


# Operators and functions whose work grows with their operands: charged a unit per this many
# elements (lists and maps are walked in Python) or characters (strings are compared in C).
_PER_ELEMENT = 4
_PER_CHAR = 2048
_SIZED = (
    "_==_",
    "_!=_",
    "_<_",
    "_<=_",
    "_>_",
    "_>=_",
    "_in_",
    "_+_",
    "contains",
    "startsWith",
    "endsWith",
    "matches",
    "string",
    "bytes",
    "list",
    "map",
)


def _weight(value: Any) -> int:
    if isinstance(value, str | bytes):
        return len(value) // _PER_CHAR
    if isinstance(value, list | dict):
        return len(value) // _PER_ELEMENT
    return 0


def _metered(function: Callable[..., Any], meter: Meter) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        meter.charge(1 + sum(_weight(a) for a in args))
        return function(*args)

    return call


def _times(a: Any, b: Any) -> Any:
    if isinstance(a, str | bytes | list) or isinstance(b, str | bytes | list):
        raise TypeError("no such overload")  # Python would repeat the string: "x" * 2**62
    return base_functions["_*_"](a, b)


MAX_DURATION_CHARS = 64
"""The longest text ``duration()`` takes: "-1234567890h59m59.999999999s" and the like fit."""
_DURATION = re2.compile(r"[-+]?([0-9]*(\.[0-9]*)?[a-z]+)+")


def _duration(value: Any) -> Any:
    r"""CEL's ``duration()``, whose text celpy checks with a backtracking pattern of Python's ``re``
    (``([0-9]*(\.[0-9]*)?[a-z]+)+``): 26 letters and a ``!`` from a payload took 7 s, doubling with
    each letter, in one call no budget can interrupt, with the GIL held. The text is checked first
    here, in linear time."""
    if isinstance(value, str) and (len(value) > MAX_DURATION_CHARS or not _DURATION.fullmatch(value)):
        raise ValueError(f"invalid duration of {len(value)} characters")
    return base_functions["duration"](value)


_CEL_OR = celtypes.logical_or
_CEL_AND = celtypes.logical_and


def _or(x: Any, y: Any) -> Any:
    """CEL's ``||``, as celpy's, but an error with an error is the first error. celpy raises a
    TypeError quoting both operands' reprs, and ``exists()`` over elements that each fail folds
    those errors into one another: the message doubled with each element, 26 empty objects took
    5 s and 1.6 GB in one call no budget could stop."""
    if not isinstance(x, celtypes.BoolType) and not isinstance(y, celtypes.BoolType):
        if isinstance(x, Exception):
            return x
        raise TypeError("no such overload for ||")
    return _CEL_OR(x, y)


def _and(x: Any, y: Any) -> Any:
    """CEL's ``&&``: as :func:`_or` (``all()`` folds the same way)."""
    if not isinstance(x, celtypes.BoolType) and not isinstance(y, celtypes.BoolType):
        if isinstance(x, Exception):
            return x
        raise TypeError("no such overload for &&")
    return _CEL_AND(x, y)


# The macros look these up on the module at each call (celpy.evaluation: exists, all).
celtypes.logical_or = _or
celtypes.logical_and = _and


_TIMESTAMP = re2.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def _timestamp(value: Any) -> Any:
    """CEL's ``timestamp()``, for RFC 3339 date-times only (a zone included). celpy parses any text
    pendulum takes, and fills a time alone (``"12:30"``) with today's date in the host's zone: the
    same filter on the same event answered otherwise from one host, or one day, to the next."""
    if isinstance(value, str) and (len(value) > MAX_DURATION_CHARS or not _TIMESTAMP.fullmatch(value)):
        raise ValueError(f"invalid timestamp of {len(value)} characters (RFC 3339 date-time with a zone)")
    return base_functions["timestamp"](value)


def _base_activation(meter: Meter) -> Activation:
    functions: dict[str, Any] = {name: _metered(base_functions[name], meter) for name in _SIZED}
    functions["_||_"] = _or
    functions["_&&_"] = _and
    functions["_*_"] = _times
    functions["duration"] = _metered(_duration, meter)
    functions["timestamp"] = _metered(_timestamp, meter)
    return Activation(annotations=_ENV.annotations, package=_ENV.package, functions=functions)


def _needs(ast: lark.Tree[Any]) -> set[Path]:
    """Every path the expression reads: ``payload.a.b`` and ``payload["x-y"]`` are paths; any
    other use of a root (``size(payload)``, ``payload[k]``, a macro over it) needs all of it."""
    found: set[Path] = set()

    def walk(node: Any) -> None:
        if not isinstance(node, lark.Tree):
            return
        if node.data == "member":
            path = _chain(node)
            if path is not None:
                found.add(path)
                return
        if node.data == "ident":
            name = str(node.children[0])
            if name in ROOTS:
                found.add((name,))
            return
        for child in node.children:
            walk(child)

    walk(ast)
    return found


def _chain(member: lark.Tree[Any]) -> Path | None:
    """``root.key["key"]…`` as a path, or None when the member is anything else."""
    child = member.children[0]
    if not isinstance(child, lark.Tree):
        return None
    if child.data == "primary":
        ident = child.children[0]
        if isinstance(ident, lark.Tree) and ident.data == "ident" and str(ident.children[0]) in ROOTS:
            return (str(ident.children[0]),)
        return None
    if child.data in ("member_dot", "member_index") and isinstance(child.children[0], lark.Tree):
        inner = _chain(child.children[0])
        key = str(child.children[1]) if child.data == "member_dot" else _string_literal(child.children[1])
        return (*inner, key) if inner is not None and key is not None else None
    return None


def _string_literal(expr: Any) -> str | None:
    """The text of a plain quoted string literal (no escapes, no prefix), else None."""
    node = expr
    while isinstance(node, lark.Tree) and len(node.children) == 1:
        node = node.children[0]
    if not isinstance(node, lark.Token):
        return None
    text = str(node)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'" and "\\" not in text and text[0] not in text[1:-1]:
        return text[1:-1]
    return None


Trie = dict[str, "Trie | None"]  # None: the value at that key, whole


def _trie(paths: Iterable[Path]) -> Trie:
    root: Trie = {}
    # A shorter path (more of the value) wins; equal lengths in a fixed order, not a set's
    # (hash-seeded), so that what a filter reads first, and so its cost, is the same in every process.
    for path in sorted(paths, key=lambda p: (len(p), p)):
        node: Trie | None = root
        for key in path[:-1]:
            assert node is not None
            node = node.setdefault(key, {})
            if node is None:
                break
        else:
            assert node is not None
            node[path[-1]] = None
    return root


def _select(value: Any, trie: Trie | None) -> Any:
    """Only the keys on the paths, below a mapping; any other value is taken whole."""
    if trie is None or not isinstance(value, dict):
        return value
    return {k: _select(value[k], sub) for k, sub in trie.items() if k in value}


_COUNTED_PER_UNIT = 32  # counting nodes is that much cheaper than converting them


def _count_nodes(values: Iterable[Any], limit: int) -> int:
    """The JSON values' nodes, counted until there are more than ``limit``."""
    stack = list(values)
    count = len(stack)
    while stack and count <= limit:
        value = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        count += len(children)
        if count <= limit:
            stack.extend(c for c in children if isinstance(c, dict | list))
    return count


def _to_cel(value: Any, meter: Meter) -> Any:
    """JSON values as CEL values, one unit per node; an integer beyond uint64 raises ValueError."""
    meter.charge(1)
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, int):
        if INT64[0] <= value <= INT64[1]:
            return celtypes.IntType(value)
        if 0 <= value <= UINT64_MAX:
            return celtypes.UintType(value)
        raise ValueError("an integer beyond 64 bits")
    if isinstance(value, float):
        return celtypes.DoubleType(value)
    if isinstance(value, str):
        return celtypes.StringType(value)
    if value is None:
        return None
    if isinstance(value, list | tuple):
        return celtypes.ListType([_to_cel(v, meter) for v in value])
    if isinstance(value, dict):
        return celtypes.MapType({celtypes.StringType(str(k)): _to_cel(v, meter) for k, v in value.items()})
    raise ValueError(f"{type(value).__name__} is not a JSON value")

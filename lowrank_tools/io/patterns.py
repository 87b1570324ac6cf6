"""Regular expressions from users and files, matched with bounded work: ``--include`` / ``--exclude`` /
``--full-modules`` and PEFT's ``rank_pattern`` / ``alpha_pattern`` keys.

Python's ``re`` backtracks, so a crafted pattern such as ``([a-z0-9_.]|[a-z0-9_.])*Z`` takes time exponential in the
length of the name it is tried on (26 characters: seconds; 40: hours). Every pattern is therefore parsed (with the
standard library's own parser) and its worst-case backtracking bounded before it is used:

- the cost of a pattern is bounded by ``C * n**d`` for a name of n characters: a literal or character class costs 1,
  a sequence multiplies, an alternation adds (or takes the largest when its branches start with distinct
  literals, so only one can be tried), ``x{m,k}`` costs about ``cost(x)**k``, and an unbounded ``x*`` / ``x+`` /
  ``x{m,}`` over a single-way body (``[a-z]*``, ``(?:ab)*``) raises the degree d by one;
- **refused** at once: an unbounded repeat over a body that can match in more than one way (a nested quantifier
  such as ``(a+)+`` or ``(.*x)*``, a quantified alternation such as ``(a|a)*`` or ``(a|ab)*``, an optional inside a
  star such as ``(a?)*``); back-references and conditional groups (``\\1``, ``(?(1)..)``); patterns longer than
  :data:`MAX_PATTERN` characters; a degree above :data:`MAX_DEGREE` (more than three stars in a row) or a
  constant above :data:`MAX_WORK`;
- **refused** when matched: a name on which ``C * (len + 1)**(d + 1)`` (one more degree for where the match may
  start) exceeds :data:`MAX_WORK` steps, naming the pattern and the name.

PEFT's keys (``rank_pattern`` / ``alpha_pattern``) keep PEFT's meaning exactly (``get_pattern_key``:
``re.match(rf"(.*\\.)?({key})$", name)``, first key in file order wins); a key that is a plain name, as every tool
writes them (escaped or not, with or without a leading ``^``), is matched as a string (``name == key`` or
``name.endswith("." + key)``) without any regex at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

try:  # the standard library's regex parser (what re.compile itself uses); Python >= 3.11 names it re._parser
    from re import _constants as _C
    from re import _parser as _sre
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _C  # type: ignore[no-redef]
    import sre_parse as _sre  # type: ignore[no-redef]

from ..errors import InvalidOption, LowRankError

__all__ = ["MAX_PATTERN", "MAX_DEGREE", "MAX_WORK", "check_pattern", "check_patterns", "safe_search",
           "peft_key_matches", "peft_pattern_value"]

MAX_PATTERN = 1000  # characters in one pattern
MAX_DEGREE = 3  # unbounded repeats one after another (each can stop anywhere in the name)
MAX_WORK = 10**8  # bound on backtracking steps for one match (~0.1 s of re at worst; the bound is loose)
_SINGLE = {_C.LITERAL, _C.NOT_LITERAL, _C.ANY, _C.IN, _C.CATEGORY, _C.AT}
_REPEATS = {_C.MAX_REPEAT, _C.MIN_REPEAT} | ({_C.POSSESSIVE_REPEAT} if hasattr(_C, "POSSESSIVE_REPEAT") else set())
_CAP = float(MAX_WORK) * 10


class _Refused(ValueError):
    """A construct whose backtracking cannot be bounded."""


def _cost(items) -> tuple[float, int]:
    """(C, d): at most C * n**d ways for ``items`` (a parsed sequence) to match part of an n-character name."""
    c, d = 1.0, 0
    for op, av in items:
        ci, di = _item_cost(op, av)
        c, d = min(c * ci, _CAP), d + di
    return c, d


def _item_cost(op, av) -> tuple[float, int]:
    if op in _SINGLE:
        return 1.0, 0
    if op is _C.SUBPATTERN:
        return _cost(av[-1])
    if op in (_C.ASSERT, _C.ASSERT_NOT):
        return _cost(av[1])
    if getattr(_C, "ATOMIC_GROUP", None) is op:
        return _cost(av)
    if op is _C.BRANCH:
        costs = [_cost(branch) for branch in av[1]]
        firsts = [branch[0] for branch in av[1] if branch and branch[0][0] is _C.LITERAL]
        d = max(di for _, di in costs)
        if len(firsts) == len(costs) and len(set(firsts)) == len(firsts):  # one branch can apply at a time
            return max(ci for ci, _ in costs), d
        return min(sum(ci for ci, _ in costs), _CAP), d
    if op in _REPEATS:
        lo, hi, body = av
        cb, db = _cost(body)
        if hi is _C.MAXREPEAT:
            if (cb, db) != (1.0, 0):
                raise _Refused("an unbounded repeat over something that can match in more than one way (a nested "
                               "quantifier like (a+)+, an alternation like (a|ab)*, or an optional inside a star)")
            return 1.0, 1
        if (cb, db) == (1.0, 0):
            return float(hi - lo + 1), 0
        return min(cb ** min(hi, 64) * (hi - lo + 1), _CAP), db * hi
    if op in (_C.GROUPREF, _C.GROUPREF_EXISTS) or "GROUPREF" in str(op):
        raise _Refused("a back-reference or conditional group")
    raise _Refused(f"the construct {op}")  # anything the parser may add later: refuse rather than guess


def check_pattern(pattern: str, what: str, *, error: type[LowRankError] = InvalidOption, shown: str | None = None,
                  degree: int = MAX_DEGREE) -> tuple[float, int]:
    """Raise ``error`` (one line naming ``what`` and the pattern, or ``shown``) unless ``pattern`` compiles and its
    worst-case work is bounded (module docstring); return its (C, d)."""
    shown = shown if shown is not None else pattern
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    if len(pattern) > MAX_PATTERN:
        raise error(f"{what} {shown!r} is {len(pattern)} characters long: at most {MAX_PATTERN} are accepted")
    try:
        parsed = _sre.parse(pattern)
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise error(f"{what} {shown!r} is not a valid regular expression ({exc})") from None
    try:
        c, d = _cost(parsed.data)
    except RecursionError:
        raise error(f"{what} {shown!r} nests groups too deeply: simplify it") from None
    except _Refused as exc:
        raise error(f"{what} {shown!r} could take exponential time to match: it holds {exc}; simplify it "
                    f"(e.g. [a-z0-9_.]* instead of ([a-z0-9_.]|[a-z0-9_.])*)") from None
    if c > MAX_WORK:
        raise error(f"{what} {shown!r} could take too long to match (nested bounded repeats or alternatives give "
                    f"more than {MAX_WORK:.0e} ways): simplify it")
    if d > degree:
        raise error(f"{what} {shown!r} could take too long to match ({d - degree + MAX_DEGREE} unbounded repeats "
                    f"in a row): use at most {MAX_DEGREE} of *, + or {{m,}} one after another")
    return c, d


def _check_work(cost: tuple[float, int], pattern: str, name: str, what: str, error, *, search: bool) -> None:
    c, d = cost
    if c * (len(name) + 1) ** (d + search) > MAX_WORK:
        raise error(f"{what} {pattern[:80]!r} could take too long to match the {len(name)}-character name "
                    f"{name[:60]!r}: simplify the pattern")


_CHECKED: dict[tuple[str, str, int], tuple[float, int]] = {}


def _checked(pattern: str, what: str, error, *, shown: str | None = None, degree: int = MAX_DEGREE):
    key = (pattern, what, degree)
    if key not in _CHECKED:
        if len(_CHECKED) > 4096:
            _CHECKED.clear()
        _CHECKED[key] = check_pattern(pattern, what, error=error, shown=shown, degree=degree)
    return _CHECKED[key]


def safe_search(patterns: Sequence[str], name: str, *, what: str = "pattern",
                error: type[LowRankError] = InvalidOption) -> bool:
    """``any(re.search(p, name) for p in patterns)`` with each pattern's work bounded first (module docstring)."""
    for pattern in patterns:
        _check_work(_checked(pattern, what, error), pattern, name, what, error, search=True)
        if re.search(pattern, name):
            return True
    return False


_META = set(".^$*+?{}[]|()\\")


def _literal(key: str) -> tuple[str, bool] | None:
    """(the name, anchored) when a PEFT key is a plain name: no unescaped metacharacter (an unescaped ``.`` is a
    regex, as in PEFT), backslashes only before punctuation, maybe a leading ``^``."""
    anchored = key.startswith("^")
    body, out, i = key[anchored:], [], 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body) and not body[i + 1].isalnum() and body[i + 1] not in "\n\r":
            out.append(body[i + 1])
            i += 2
        elif ch in _META:
            return None
        else:
            out.append(ch)
            i += 1
    return "".join(out), anchored


def peft_key_matches(key: str, name: str, *, what: str = "rank_pattern key",
                     error: type[LowRankError] = InvalidOption) -> bool:
    """PEFT's ``re.match(rf"(.*\\.)?({key})$", name)``: plain names matched as strings, any other key's work
    bounded first. A key PEFT cannot compile matches nothing (PEFT itself would fail on it)."""
    literal = _literal(key) if "\n" not in name and "\r" not in name else None
    if literal is not None:
        plain, anchored = literal
        return name == plain or (not anchored and name.endswith("." + plain))
    wrapped = rf"(.*\.)?({key})$"
    try:
        re.compile(wrapped)
    except (re.error, RecursionError, OverflowError):
        return False
    cost = _checked(wrapped, what, error, shown=key, degree=MAX_DEGREE + 1)  # + PEFT's (.*\.)? prefix
    _check_work(cost, key, name, what, error, search=False)
    return re.match(wrapped, name) is not None


def peft_pattern_value(patterns: dict, name: str, default, *, what: str = "rank_pattern",
                       error: type[LowRankError] = InvalidOption):
    """PEFT's rule (``get_pattern_key``): the value of the first key, in order, that matches the end of ``name``."""
    for key, value in patterns.items():
        if peft_key_matches(key, name, what=f"{what} key", error=error):
            return value
    return default


def check_patterns(patterns: Iterable[str], what: str, *, error: type[LowRankError] = InvalidOption) -> None:
    """Check every pattern up front (so a bad one fails before any work)."""
    for pattern in patterns:
        _checked(pattern, what, error)

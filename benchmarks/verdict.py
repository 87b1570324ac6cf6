"""The last lines every benchmark script prints: its verdict, and its exit status."""

from __future__ import annotations


def verdict(failed: list[str], *, quick: bool, what: str = "bars are") -> int:
    """Print ``all bars met`` or ``FAILED: ...``; with ``quick`` (small shapes, where fixed costs dominate) only what
    the full run would miss. Returns the exit status: 1 when a bar is missed on a full run, else 0."""
    if quick:
        print(f"\n--quick: {what} judged by the full run only" + (f" (would miss: {'; '.join(failed)})" if failed else ""))
        return 0
    print("\n" + ("FAILED: " + "; ".join(failed) if failed else "all bars met"))
    return 1 if failed else 0

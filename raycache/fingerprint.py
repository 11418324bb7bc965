"""The fingerprint line a cache's actor compares, and the message when two differ.

The actor holds one line per cache and compares it with each attaching client's line; it
never sees the providers. So the line carries enough to explain a mismatch: the class
``__qualname__``, the length, a short digest, how the identity was given and a short
digest per field. :func:`format_fingerprint` writes it and :func:`mismatch_message`
reads two of them back to say which fields differ and what the user can do; both sides
of the format live here so they cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from raycache.digest import stable_digest

__all__ = ["format_fingerprint", "mismatch_message"]

_FIELD_DIGEST_HEX = 8
_MAX_SHOWN_FIELDS = 24

_FINGERPRINT = re.compile(
    r"^(?P<qualname>.+)\[(?P<length>\d+)\] digest (?P<digest>[0-9a-f]+) "
    r"\((?P<source>[^:]+): (?P<body>.*?)(?:; left out: (?P<left>.*))?\)$"
)


def format_fingerprint(
    qualname: str,
    length: int,
    digest: str,
    source: str,
    fields: Sequence[tuple[str, str]],
    left_out: Sequence[str] = (),
) -> str:
    """Write the one readable line that describes a cache identity.

    Parameters
    ----------
    qualname : str
        The provider class's ``__qualname__``.
    length : int
        The provider's length.
    digest : str
        The identity's hex digest.
    source : str
        How the identity was given (``"state"``, ``"cache_identity()"``,
        ``"raycache.identity"``).
    fields : sequence of (str, str)
        Field name and hex digest; the first ``_MAX_SHOWN_FIELDS`` are shown, the rest
        summed up in one digest so the line stays short.
    left_out : sequence of str, optional
        Attributes the rule left out, shown so a user can see what did not count.

    Returns
    -------
    str
        ``"<qualname>[<length>] digest <16 hex> (<source>: f=<8 hex> ...; left out: ...)"``.
    """
    shown = fields[:_MAX_SHOWN_FIELDS]
    body = " ".join(f"{k}={v[:_FIELD_DIGEST_HEX]}" for k, v in shown)
    if len(fields) > len(shown):
        rest = stable_digest(tuple(fields[len(shown) :]))[:_FIELD_DIGEST_HEX]
        body += f" +{len(fields) - len(shown)}more={rest}"
    text = f"{qualname}[{length}] digest {digest[:16]} ({source}: {body}"
    if left_out:
        text += "; left out: " + " ".join(left_out)
    return text + ")"


def _parse(fingerprint: str) -> dict | None:
    m = _FINGERPRINT.match(fingerprint)
    if m is None:
        return None
    fields = dict(part.split("=", 1) for part in m["body"].split() if "=" in part)
    return {
        "qualname": m["qualname"],
        "length": int(m["length"]),
        "source": m["source"],
        "fields": fields,
    }


def _differences(cached: str, mine: str) -> list[str]:
    a, b = _parse(cached), _parse(mine)
    if a is None or b is None:
        return []
    out = []
    if a["qualname"] != b["qualname"]:
        out.append(f"class ({a['qualname']} in the cache, {b['qualname']} here)")
    if a["length"] != b["length"]:
        out.append(f"length ({a['length']} in the cache, {b['length']} here)")
    if a["source"] != b["source"]:
        out.append(f"how the identity is given ({a['source']} in the cache, {b['source']} here)")
        return out
    for key in sorted(set(a["fields"]) | set(b["fields"])):
        x, y = a["fields"].get(key), b["fields"].get(key)
        if x != y:
            out.append(f"{key} ({x or 'absent'} in the cache, {y or 'absent'} here)")
    return out


def mismatch_message(name: str, cached_length: int, cached: str, length: int, mine: str) -> str:
    """Say why a provider does not match the cache it asked for, and what to do.

    Parameters
    ----------
    name : str
        The cache name.
    cached_length : int
        The cache's length.
    cached : str
        The cache's fingerprint (``CacheIdentity.fingerprint``).
    length : int
        This client's length.
    mine : str
        This client's fingerprint.

    Returns
    -------
    str
        The message for ``CacheMismatchError``.
    """
    diffs = _differences(cached, mine)
    if not diffs and cached_length != length:
        diffs = [f"length ({cached_length} in the cache, {length} here)"]
    what = "; they differ in " + ", ".join(diffs) if diffs else ""
    return (
        f"cache {name!r} holds {cached_length} items of [{cached}], but this process's "
        f"provider has {length} items of [{mine}]{what}. To keep both, give this provider "
        f"another raycache.name (or a raycache.identity); to drop the cached items and "
        f'refill the cache from this provider, set raycache.on_mismatch = "rebuild" '
        f"(or call raycache.drop_cache({name!r}))."
    )

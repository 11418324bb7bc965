"""Generate the configuration reference from ``raycache.config``'s key tables.

At ``builder-inited`` this writes ``_generated/config_keys.md``, which
``configuration.md`` includes. Every key must have an example below: a key added to
``raycache.config`` without one fails the build, so the reference cannot fall behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# One example value per key, as it is written in a TOML file.
EXAMPLES = {
    ("data_set", "use_cache"): "true",
    ("data_set", "preload_cache"): "true",
    ("data_set", "preload_threads"): "16",
    ("raycache", "name"): '"hsc-cutouts-train"',
    ("raycache", "namespace"): '"team-astro"',
    ("raycache", "address"): '"auto"',
    ("raycache", "max_bytes"): "20_000_000_000",
    ("raycache", "chunk_size"): "4096",
    ("raycache", "chunk_bytes"): "33_554_432",
    ("raycache", "preload_cpus"): "0.25",
    ("raycache", "preload_item_timeout_s"): "60",
    ("raycache", "preload_on_error"): '"stop"',
    ("raycache", "detached"): "true",
    ("raycache", "linger_s"): "300",
    ("raycache", "flush_interval_s"): "0.05",
    ("raycache", "zero_copy"): "true",
    ("raycache", "locality"): '"nodes"',
    ("raycache", "log_dir"): '"runs/cache"',
    ("raycache", "timeout_s"): "120",
    ("raycache", "identity"): '"hsc-pdr3-v2"',
    ("raycache", "on_mismatch"): '"rebuild"',
    ("raycache", "provider"): '"mypackage.data:make_provider"',
}


def _unit(key: str) -> str:
    if key.endswith("_s"):
        return "seconds"
    if key.endswith("bytes"):
        return "bytes"
    if key in ("preload_cpus",):
        return "CPUs"
    if key in ("preload_threads",):
        return "reads in flight"
    if key in ("chunk_size",):
        return "items"
    return ""


def _type(spec: Any) -> str:
    names = " or ".join(t.__name__ for t in spec.types)
    if getattr(spec, "choices", None):
        names += " (" + " / ".join(f'"{c}"' for c in spec.choices) + ")"
    if spec.minimum is not None:
        names += f" ≥ {spec.minimum:g}"
    return names


def _default(spec: Any) -> str:
    if spec.default is None:
        return "unset"
    if isinstance(spec.default, bool):
        return "`true`" if spec.default else "`false`"
    if isinstance(spec.default, str):
        return f'`"{spec.default}"`'
    return f"`{spec.default!r}`"


def render() -> str:
    """Return the Markdown tables of every config key."""
    from raycache.config import DATA_SET_KEYS, RAYCACHE_KEYS

    out = []
    for table, keys in (("data_set", DATA_SET_KEYS), ("raycache", RAYCACHE_KEYS)):
        out += [
            f"### `[{table}]`",
            "",
            "| key | type | default | unit | example | meaning |",
            "|---|---|---|---|---|---|",
        ]
        for key, spec in keys.items():
            try:
                example = EXAMPLES[(table, key)]
            except KeyError:
                raise RuntimeError(
                    f"config key {table}.{key} has no example in docs/_ext/config_keys.py; "
                    "add one so the configuration reference documents it"
                ) from None
            doc = " ".join(spec.doc.split()).replace("|", "\\|")
            out.append(
                f"| `{key}` | {_type(spec)} | {_default(spec)} | {_unit(key)} | "
                f"`{key} = {example}` | {doc} |"
            )
        out.append("")
    return "\n".join(out)


def _write(app: Any) -> None:
    target = Path(app.srcdir) / "_generated" / "config_keys.md"
    target.parent.mkdir(exist_ok=True)
    text = render()
    if not target.exists() or target.read_text() != text:
        target.write_text(text)


def setup(app: Any) -> dict:
    """Register the generator with Sphinx."""
    app.connect("builder-inited", _write)
    return {"parallel_read_safe": True, "version": "1"}

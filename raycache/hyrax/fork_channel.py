"""Let forked DataLoader workers read and fill the shared cache through their parent.

Hyrax 0.9+ forks its DataLoader workers (``multiprocessing_context="fork"``), and Ray is
not fork-safe: a forked worker must make no Ray call (``raycache.runtime``). It can read
the chunks its parent had mapped when it was forked, but learns of nothing stored after
that, so a persistent worker would read again every item the cache got after its fork,
and two workers would each read an item both miss.

So a forked worker asks its parent: the parent, connected to Ray, answers each question
with the handler the cache registered (``raycache.hyrax.fill.OnceFill`` behind it). The
channel itself is ``raycache.fork_requests``, shared with the core client's forked
reads (``raycache.client.fork_reads``): one socket per child carries both.
"""

from __future__ import annotations

from raycache.fork_requests import (
    REPLY_TIMEOUT_S,
    ChildLinkError,
    ask_parent,
    child_link,
    register,
)

__all__ = ["REPLY_TIMEOUT_S", "ChildLinkError", "ask_parent", "child_link", "register"]

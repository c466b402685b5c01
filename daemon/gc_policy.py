"""Long-running processes freeze what they keep from their start out of the cyclic collector."""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Call once a process has started: its modules, configuration, compiled SQL, web app
    and caches live as long as it does. Frozen, the cyclic collector stops walking them,
    so a full collection takes about 0 ms instead of about 0.1 s in serve (measured after
    its imports: 286,000 objects, 0.11 s) or 0.27 s in a worker after a CT job. A full
    collection holds the GIL: every association of the receiver waits for it."""
    gc.collect()
    gc.freeze()

"""Process limits the daemon raises for itself at start-up."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("gateway.limits")


def raise_open_files(want: int = 65536) -> int:
    """Raise the soft open-file limit towards the hard one (SMTP sessions are file descriptors)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("rlimit_nofile_failed", extra={"fields": {"error": str(exc)}})
    return int(soft)

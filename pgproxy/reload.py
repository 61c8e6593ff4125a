"""What a config reload (SIGHUP, ``POST /api/reload``) may change in a running proxy.

Policy, masking rules, identity (JWKS, issuer, leeway...), TLS certificates, upstream and limits are
rebuilt from the file and used by new sessions and new statements; open sessions are never dropped.
Listener addresses and the audit, approvals, admin and HTTP sections hold sockets, files and stores
that live as long as the process: a reload that changes them is refused (the running config stays).
"""

from __future__ import annotations

from .config import ProxyConfig

RESTART_ONLY_SECTIONS = ("audit", "approvals", "admin", "http")


class ReloadError(Exception):
    """The new config was not applied; the message says why. The running config stays in force."""


def restart_only_changes(old: ProxyConfig, new: ProxyConfig) -> list[str]:
    """The dotted names of settings that differ between ``old`` and ``new`` but need a restart."""
    changed: list[str] = []
    if len(old.listeners) != len(new.listeners):
        changed.append("listeners")
    else:
        for i, (a, b) in enumerate(zip(old.listeners, new.listeners, strict=True)):
            changed += [f"listeners[{i}].{name}" for name in ("host", "port", "insecure_plaintext")
                        if getattr(a, name) != getattr(b, name)]
            if (a.tls is None) != (b.tls is None):
                changed.append(f"listeners[{i}].tls")
    changed += [name for name in RESTART_ONLY_SECTIONS if getattr(old, name) != getattr(new, name)]
    if (old.policy is None) != (new.policy is None):
        changed.append("policy")  # adding or removing the policy gate changes which approval store exists
    return changed

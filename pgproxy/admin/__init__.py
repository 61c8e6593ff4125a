"""The admin HTTP listener: the approvals API for human approvers."""

from pgproxy.admin.server import AdminServer

__all__ = ["AdminServer"]

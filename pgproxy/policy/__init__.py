"""Statement classification, policy decisions and just-in-time approvals."""

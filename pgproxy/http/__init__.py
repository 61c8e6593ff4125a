"""The HTTP companion proxy: the Postgres side's identity, policy, approvals and audit for HTTP APIs."""

"""The proxy's session logic without I/O: what a connection does, driven by bytes and events."""

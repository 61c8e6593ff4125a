"""The neutral, sans-I/O core: the plug-in types, the one Statement each request is read into, and the
session state machine a connection runs, driven by bytes and events."""

"""Neutral, sans-I/O core: the plug-in types and the one Statement object each request is read into."""

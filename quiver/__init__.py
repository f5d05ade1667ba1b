"""Quiver: turn a changing document collection into fresh vector indexes."""

__version__ = "0.1.0"

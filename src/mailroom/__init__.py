"""Mailroom: send one message to a whole audience, one recipient per envelope."""

__version__ = "0.1.0"

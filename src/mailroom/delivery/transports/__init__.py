"""Transports: one interface, several implementations chosen by name."""

from mailroom.delivery.transports.base import Delivery, Transport

__all__ = ["Delivery", "Transport"]

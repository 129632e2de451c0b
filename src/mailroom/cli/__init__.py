"""The ``mailroom`` command: the demo, and operator and approver commands."""

"""The outbox's revisions, oldest first by ``down_revision`` (files named after their ids)."""

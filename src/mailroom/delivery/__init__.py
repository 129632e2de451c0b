"""Delivery: shards send the frozen batches through a transport, under one rate, with every
batch's and recipient's state in the outbox; the report reconciles them."""

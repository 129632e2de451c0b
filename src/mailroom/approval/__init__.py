"""What the approver reads (the summary) and the canary send to the seed list before it."""

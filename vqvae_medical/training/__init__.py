"""Shared training machinery: iteration-step helpers, checkpoints, handlers, schedules, devices and DDP."""

"""Ticket-system backends: one small interface (`base.Backend`), four implementations."""

"""ticket-gateway: an email-to-ticket gateway (SMTP, IMAP and MTA-pipe intake; four ticket systems)."""

__version__ = "0.1.0"

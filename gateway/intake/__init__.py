"""Intakes: SMTP listener, IMAP poller, MTA pipe. They store raw bytes and an envelope, nothing else."""

"""Simulators of the four ticket systems, an SMTP sink, and the `/_sim` inspection API.

Real servers on loopback implementing the documented contracts (shared/contracts/), with fault
injection; used by the tests, the quick start and the acceptance checks (`gateway simulate`).
"""

"""Prometheus series: outcomes by intake/rule/backend, queue depth, oldest age, latency, the state
of each component (as /healthz), acknowledgements sent and held back (`gateway_acks_withheld_total
{reason}`: the policy's reasons and the hourly limits, rate_sender/rate_domain/rate_global).

contrib/prometheus/ticket-gateway.rules.yml alerts on them; contrib/grafana/ shows them.

Labels never carry addresses or message content: only intake names, rule names, backend names.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

OUTCOMES = ("received", "ticketed", "followup", "suppressed", "deferred", "dead", "duplicate")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.received = Counter(
            "gateway_received", "Messages stored by an intake", ["intake"], registry=self.registry
        )
        self.outcomes = {
            name: Counter(
                f"gateway_{name}",
                f"Messages with outcome {name}",
                ["intake", "rule", "backend"],
                registry=self.registry,
            )
            for name in OUTCOMES
            if name != "received"
        }
        self.queue_depth = Gauge(
            "gateway_queue_depth",
            "Messages waiting (queued, deferred, processing)",
            registry=self.registry,
        )
        self.oldest_age = Gauge(
            "gateway_oldest_queued_age_seconds",
            "Age of the oldest waiting message",
            registry=self.registry,
        )
        self.dead_letters = Gauge(
            "gateway_dead_letters", "Messages in the dead state", registry=self.registry
        )
        self.outbox_pending = Gauge(
            "gateway_outbox_pending", "Acknowledgements waiting to be sent", registry=self.registry
        )
        self.acks_sent = Counter(
            "gateway_acks_sent", "Acknowledgements delivered to the relay", registry=self.registry
        )
        self.acks_withheld = Counter(
            "gateway_acks_withheld",
            "Acknowledgements the rules asked for that did not go out, by reason"
            " (unauthenticated, rate_sender, rate_domain, rate_global, no_reply_address,"
            " suppress_requested, ...)",
            ["reason"],
            registry=self.registry,
        )
        self.possible_duplicates = Counter(
            "gateway_possible_duplicates",
            "Tickets created again for a mail whose create call was in flight at a crash, where"
            " the ticket system cannot be searched for the first one",
            ["backend"],
            registry=self.registry,
        )
        self.recovered = Counter(
            "gateway_recovered",
            "Mails put back after their worker died (kind=requeued), of which a backend call was"
            " in flight (kind=uncertain: a second ticket is possible for these only)",
            ["kind"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "gateway_backend_latency_seconds",
            "Time of one backend operation (all its calls)",
            ["backend", "result"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.component_up = Gauge(
            "gateway_component_up",
            "1 when the component (spool, intake, backend, rules, outbox) works, as in /healthz",
            ["component", "kind"],
            registry=self.registry,
        )
        self.backend_paused = Gauge(
            "gateway_backend_paused",
            "1 while a backend is paused (its credentials or configuration were refused)",
            ["backend"],
            registry=self.registry,
        )
        self._refresh: Callable[[], None] | None = None

    def outcome(self, name: str, intake: str, rule: str, backend: str) -> None:
        counter = self.outcomes.get(name)
        if counter is not None:
            counter.labels(intake=intake or "-", rule=rule or "-", backend=backend or "-").inc()

    def recovered_mails(self, requeued: int, uncertain: int) -> None:
        self.recovered.labels(kind="requeued").inc(requeued)
        self.recovered.labels(kind="uncertain").inc(uncertain)

    def count(self, name: str, **labels: str) -> None:
        """Add one to the counter `name` (an attribute: acks_sent, acks_withheld, ...)."""
        counter = getattr(self, name, None)
        if not isinstance(counter, Counter):
            raise ValueError(f"no counter named {name!r}")
        (counter.labels(**labels) if labels else counter).inc()

    def backend_latency(self, backend: str, seconds: float, ok: bool) -> None:
        self.latency.labels(backend=backend, result="ok" if ok else "error").observe(seconds)

    def on_scrape(self, refresh: Callable[[], None]) -> None:
        self._refresh = refresh

    def render(self) -> bytes:
        if self._refresh is not None:
            self._refresh()
        return generate_latest(self.registry)

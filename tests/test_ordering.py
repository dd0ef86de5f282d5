"""Prefix-aware ordering: GGR field orders, prefix-sorted batches, answers still in input order."""

from __future__ import annotations

from ai_functions.ordering import ggr_field_orders, prefix_order, prompts_for
from serving.data.backends import EchoBackend
from tests.registry_helpers import duckdb_on


def test_ggr_puts_shared_values_first_per_group():
    rows = [{"review": f"unique review {i}", "category": "kitchen" if i < 4 else "audio", "instruction": "Judge it." * 5}
            for i in range(6)]
    orders = ggr_field_orders(rows)
    assert all(order[0] == "instruction" for order in orders)  # shared by all, and the longest
    assert all(order[1] == "category" and order[2] == "review" for order in orders)
    prompts = prompts_for(rows)
    assert prompts[0].startswith("instruction: Judge it.") and "category: kitchen\nreview: unique review 0" in prompts[0]


def test_prefix_order_groups_shared_prefixes():
    prompts = ["b x", "a y", "b y", "a x"]
    assert [prompts[i] for i in prefix_order(prompts)] == ["a x", "a y", "b x", "b y"]


class RecordingEcho(EchoBackend):
    def __init__(self):
        super().__init__()
        self.sent: list[str] = []

    def chat(self, conversations, options, on_result=None):
        self.sent.extend(c[-1]["content"] for c in conversations)
        return super().chat(conversations, options.model_copy(update={"max_tokens": None}), on_result)


def test_struct_requests_are_sent_in_prefix_order_and_answered_in_input_order():
    backend = RecordingEcho()
    with duckdb_on("echo", backend) as con:
        rows = con.execute("SELECT i, ai_query('echo', {'review': 'review ' || i, 'product': 'product ' || (i % 2)}) "
                           "FROM range(6) t(i) ORDER BY i").fetchall()
    for i, answer in rows:
        assert f"review: review {i}" in answer and answer.startswith(f"product: product {i % 2}")
    assert backend.sent == sorted(backend.sent)  # the batch went in prefix order

"""Schema-based fuzzing of the HTTP API with every schemathesis check (issue 16, point 2).

Bodies are generated from the server's own OpenAPI schema, valid and invalid, for every route; each
response must be documented (status, content type, error shape), never a server error, and valid
bodies must be accepted. "Accepted" includes the documented 400s for limits a schema cannot state
(an input's length in tokens, text that cannot be encoded) and 404 for prefixes that do not exist.
Bounded: 25 bodies per route, about a minute.
"""

import hypothesis
import schemathesis
import torch
from hypothesis import HealthCheck, given

from prefixtune.serving.app import ServerSettings, create_app

EXAMPLES = 25
CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "400", "404", "409", "413"]
"""


def test_every_route_survives_schema_fuzzing_with_all_checks(served):
    model, tok, directory = served
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    app = create_app(model, tok, directory, ServerSettings(max_new_tokens=8, max_input_tokens=64))
    app.state.registry.load_all()
    app.state.engine.start()
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=schemathesis.Config.from_str(CONFIG))
    failures, calls = [], {}
    try:
        for result in schema.get_all_operations():
            operation = result.ok()

            @given(case=operation.as_strategy())
            @hypothesis.settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,  # the same bodies on every run: CI never flakes on a new draw
                suppress_health_check=list(HealthCheck),
            )
            def run(case):
                label = case.operation.label
                calls[label] = calls.get(label, 0) + 1
                try:
                    case.call_and_validate()
                except Exception as e:  # noqa: BLE001 - collected, reported together below
                    failures.append(f"{label}: {e}"[:2000])

            torch.manual_seed(0)
            run()
    finally:
        app.state.engine.stop(drain=False, timeout=5)
    assert not failures, "\n\n".join(failures[:5])
    routes = {"POST /v1/generate", "POST /v1/completions", "POST /v1/chat/completions", "POST /v1/prefixes"}
    routes |= {"DELETE /v1/prefixes/{name}"}
    assert routes <= set(calls) and all(calls[r] >= EXAMPLES // 2 for r in routes), calls

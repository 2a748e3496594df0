"""API fuzzing: schemathesis generates requests from the live server's /openapi.json, valid ones and
ones the schema refuses, and sends them to the server on the bundled model (conftest.py's `served`).

Every response must be something other than a 5xx, within a per-request timeout (no hang); every
4xx must be OpenAI's error shape (Anthropic's for /v1/messages); a request the schema refuses must
be refused (the readers are as strict as the schema says); and afterwards no request is left in the engine and every KV page is
free. Generation is kept short (max_tokens <= 4, n <= 2) and each operation's run is bounded in
examples and in time (SECONDS_PER_RUN), so the whole takes 20-60 s on two cores. Examples are
derandomized, the same every run; JAXINFER_FUZZ_EXAMPLES=<n> and JAXINFER_FUZZ_SECONDS=<s> run more.
"""

import os
import time

import requests
import schemathesis
from helpers import idle
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import negative_data_rejection

EXAMPLES = int(os.environ.get("JAXINFER_FUZZ_EXAMPLES", "100"))  # per operation and mode
SECONDS_PER_RUN = float(os.environ.get("JAXINFER_FUZZ_SECONDS", "10"))  # then the rest of the examples pass unsent
REQUEST_TIMEOUT_S = 30  # a request still unanswered then is a hang
MAX_GENERATED = {"max_tokens": 4, "max_completion_tokens": 4, "max_output_tokens": 4, "n": 2}


def bound_generation(body, label: str) -> None:
    """Caps the integers that set how much a valid request generates; a missing max_tokens (chat's
    default is the whole context) becomes the cap (the Responses API's max_output_tokens), but where
    it is required (Anthropic's messages: its absence is to be refused). Values of other types are
    left to be refused."""
    if not isinstance(body, dict):
        return
    for name, cap in MAX_GENERATED.items():
        if type(body.get(name)) is int and body[name] > cap:
            body[name] = cap
    if label == "POST /v1/responses":
        if body.get("max_output_tokens") is None:
            body["max_output_tokens"] = MAX_GENERATED["max_output_tokens"]
    elif body.get("max_tokens") is None and body.get("max_completion_tokens") is None and label != "POST /v1/messages":
        body["max_tokens"] = MAX_GENERATED["max_tokens"]


def assert_error_shape(label: str, response: requests.Response) -> None:
    body = response.json()
    if label == "POST /v1/messages":  # Anthropic's shape
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, response.text
        assert body["error"]["message"], response.text
        return
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text


def test_generated_requests_get_no_5xx_no_hang_and_leave_no_request_or_page(served):
    assert idle(served)
    # Admission by expected wait (tests/test_admission.py) may rightly answer a generated request of
    # many long prompts with 503 + Retry-After, depending on the prefill rate measured so far: off
    # here, where any 5xx is a finding about input handling.
    max_queue_wait, served.async_engine.max_queue_wait = served.async_engine.max_queue_wait, None
    try:
        fuzz(served)
    finally:
        served.async_engine.max_queue_wait = max_queue_wait


def fuzz(served):
    schema = schemathesis.openapi.from_url(f"{served.url}/openapi.json")
    session = requests.Session()
    statuses = {}

    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [GenerationMode.POSITIVE]
        if len(operation.body):  # the GETs take no parameters: nothing to make invalid
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def send(case):
                if time.monotonic() > deadline:
                    return
                bound_generation(case.body, operation.label)
                response = case.call(base_url=served.url, session=session, timeout=REQUEST_TIMEOUT_S)
                key = (operation.label, mode.value, response.status_code)
                statuses[key] = statuses.get(key, 0) + 1
                case.validate_response(response, checks=[not_a_server_error, negative_data_rejection])
                if 400 <= response.status_code < 500:
                    assert_error_shape(operation.label, response)

            deadline = time.monotonic() + SECONDS_PER_RUN
            send()

    print(f"fuzz: {sum(statuses.values())} requests; (operation, mode, status): count = {statuses}")
    accepted = sum(n for (label, _, status), n in statuses.items() if label.startswith("POST") and status == 200)
    assert accepted >= 5, "too few valid generation requests to say anything"
    assert idle(served), (served.async_engine.stats, served.engine.allocator.num_free_pages)
    assert served.engine.allocator.num_free_pages == served.engine.allocator.num_pages
    assert not served.engine.has_unfinished_requests()

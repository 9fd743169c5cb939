"""Small helpers shared by the API tests."""
import json
import re


def sse_events(text: str) -> list:
    """The data: payloads of a server-sent event stream, parsed; "[DONE]" kept as the string."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def metric_values(exposition: str, name: str) -> dict[str, float]:
    """{label string: value} of every sample of one series in a Prometheus exposition."""
    values = {}
    for line in exposition.splitlines():
        match = re.fullmatch(rf"{re.escape(name)}(\{{[^}}]*\}})? (\S+)", line)
        if match:
            values[match.group(1) or ""] = float(match.group(2))
    return values


def assert_error(response, status: int, param: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error

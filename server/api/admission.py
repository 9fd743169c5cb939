"""Back-pressure: how many engine requests may wait for their first token before new ones get 429.

429 means "retry later and it will pass", so a request that could never fit (more prompts than
may wait at all) gets 400 instead.
"""
from server.api.errors import APIError, bad_request


class Admission:
    """Engine requests accepted but not yet given their first token; beyond max_waiting new
    requests get 429. Routes `check` before answering, so a stream is normally refused with a
    status; `admit` reserves when generation starts."""

    def __init__(self, max_waiting: int | None = None):
        self.max_waiting = max_waiting
        self.num_waiting = 0

    def check(self, count: int) -> None:
        if self.max_waiting is not None and count > self.max_waiting:
            raise bad_request(f"the request has {count} prompts, and at most {self.max_waiting} may wait at once "
                              "(--max-waiting): split it", "prompt")
        if self.max_waiting is not None and self.num_waiting + count > self.max_waiting:
            raise APIError(429, f"the server is busy ({self.num_waiting} requests waiting); retry shortly",
                           code="queue_full", headers={"Retry-After": "1"})

    def admit(self, count: int) -> "WaitTicket":
        self.check(count)
        self.num_waiting += count
        return WaitTicket(self, count)


class WaitTicket:
    """One request's places in the waiting count, given back at its first token (or its end)."""

    def __init__(self, admission: Admission, count: int):
        self.admission = admission
        self.waiting = [True] * count

    def release(self, i: int) -> None:
        if self.waiting[i]:
            self.waiting[i] = False
            self.admission.num_waiting -= 1

    def release_all(self) -> None:
        for i in range(len(self.waiting)):
            self.release(i)

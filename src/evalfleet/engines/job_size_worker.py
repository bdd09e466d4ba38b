"""`python -m evalfleet.engines.job_size_worker`: count one request in a process of its own.

The web server counts a client's job here (`job_size.count_request`), so that lm-eval's task
building, and any code a task runs, stays out of the server's process. The request comes as
JSON on standard input; one JSON answer goes to standard output: `{"size": {...}}`,
`{"not_counted": reason}` or `{"refused": sentence}` (a wrong request, such as an unknown task).
"""

from __future__ import annotations

import contextlib
import json
import sys

from evalfleet.engines.job_size import NotCounted, count_here
from evalfleet.types import EvaluationRequest, UsageError


def main() -> None:
    request = EvaluationRequest.model_validate_json(sys.stdin.read())
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the answer is the only thing on standard output
            answer = {"size": count_here(request)}
    except NotCounted as reason:
        answer = {"not_counted": str(reason)}
    except UsageError as error:
        answer = {"refused": str(error)}
    sys.stdout.write(json.dumps(answer))


if __name__ == "__main__":
    main()

"""Child process for the kill test: capture a scenario into a store, but stop for good at
decode pass N (after that pass's tensors went to the writer) and say so on stdout, so the
parent can SIGKILL it mid-decode.

    python capture_child.py SCENARIO.yaml STORE_URL ENDPOINT_URL PAUSE_AT
"""

from __future__ import annotations

import sys
import time
from typing import Any

from actstore.capture import sampling
from actstore.capture.runner import capture
from actstore.scenario import load_scenario


def main() -> None:
    scenario_path, location, endpoint, pause_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    choose = sampling.choose
    calls = 0

    def pausing_choose(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == pause_at:
            print("mid-decode", flush=True)
            time.sleep(600)  # the parent kills us here
        return choose(*args, **kwargs)

    sampling.choose = pausing_choose  # the runner calls sampling.choose(...) at every pass
    capture(
        load_scenario(scenario_path), location, storage_options={"endpoint_url": endpoint}, progress=False
    )
    print("finished", flush=True)


if __name__ == "__main__":
    main()

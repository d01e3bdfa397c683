"""What one ``Recommend`` costs the server outside the model maths.

Times, per request, the steps around the model on parsed protobuf requests shaped like
protocol S1 "gRPC" (20 interactions, 1,000 candidate ids, a catalogue of 2,000 integer ids),
each request parsed afresh from bytes as the server receives it:

* ``candidates``: 1,000 candidate id strings to item indices, with the unknown-id and
  duplicate checks (``metarec_server.validation.parse_candidates``, on the event loop);
* ``interactions``: 20 interactions to indices, ratings and timestamps, all checked;
* ``cache digest``: the adapted-user cache key of those interactions;
* ``seen mask``: which of the 1,000 candidates the user's 20 interactions hold, as the batch
  worker masks them before the top k (``metarec.ranking.is_seen``), and ``np.isin`` beside it;
* ``protobuf parse``: ``RecommendRequest.FromString`` of the serialized request, for scale
  (gRPC does this in C before the handler runs).

No Keras import: the catalogue is a plain ``ServingModel`` without a learner. Usage:

    python bench/request_path.py                 # median microseconds per request
"""


from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metarec.api.v1 import recommender_pb2 as pb  # noqa: E402
from metarec.ranking import is_seen  # noqa: E402
from metarec_server.cache import interactions_digest  # noqa: E402
from metarec_server.inference import Catalog, ServingModel  # noqa: E402
from metarec_server.validation import Limits, parse_candidates, parse_interactions  # noqa: E402


def requests(n: int, num_items: int = 2000, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        items = rng.choice(np.arange(1, num_items + 1), 1020, replace=False)
        request = pb.RecommendRequest(candidate_item_ids=[str(i) for i in items[20:]], k=10)
        for item in items[:20]:
            request.user.interactions.add(item_id=str(item), rating=float(rng.integers(1, 6)),
                                          timestamp=int(rng.integers(1, 10**9)))
        out.append(request.SerializeToString())
    return out


def median_us(step, payloads: list[bytes], repeats: int) -> float:
    """``step(request, data)`` returns the thunk to time; whatever it does first is not timed."""
    times = []
    for _ in range(repeats):
        for data in payloads:
            run = step(pb.RecommendRequest.FromString(data), data)  # fresh strings, as on the server
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return round(float(np.median(times)) * 1e6, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--repeats", type=int, default=4)
    args = p.parse_args(argv)
    model = ServingModel(learner=None, catalog=Catalog(list(range(1, 2001))), feedback="explicit",
                         rating_range=(1.0, 5.0), user_features={})
    limits = Limits()
    payloads = requests(args.requests)

    def parsed(request):
        return parse_interactions(request.user.interactions, model, limits)

    def seen(request):  # (candidate indices, seen indices), as the batch worker holds them
        return parse_candidates(request.candidate_item_ids, model, limits), parsed(request).item_idx

    steps = {
        "candidates": lambda r, _: partial(parse_candidates, r.candidate_item_ids, model, limits),
        "interactions": lambda r, _: partial(parsed, r),
        "cache digest": lambda r, _: partial(interactions_digest, parsed(r).rows),
        "seen mask": lambda r, _: partial(is_seen, *seen(r)),
        "seen mask, np.isin": lambda r, _: partial(np.isin, *seen(r)),
        "protobuf parse": lambda _, data: partial(pb.RecommendRequest.FromString, data),
    }
    result = {name: median_us(step, payloads, args.repeats) for name, step in steps.items()}
    print(json.dumps({"median_us_per_request": result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The per-user runtime: adapt to users, score and rank their candidates.

A request's path from a DataFrame to a top-k list (``learner.adapt_recommend_many(frames,
k)``, or ``learner.runtime.recommend(frames, k)``):

1. ``personalizer.py``: ``Personalizer.recommend`` (``learner.runtime``) ->
2. ``requests.py``: ``support_batch`` (frames -> one padded ``SupportBatch``: encoded items,
   ratings, mask, user features, seen ids) and ``candidates`` (-> ``Candidates``: encoded
   candidate indices, shared or per user), ``item_batch`` (padded for the program) ->
3. ``kernels.py``: ``KernelCache.adapt_and_score`` (compiled once per traced settings) runs
   ``adapt_and_score`` = ``adapt`` (``learner.adapt_user`` vectorised over users) + ``score``
   (the model's forward pass with the adapted weights) ->
4. back in ``personalizer.py``: ``Personalizer._rank`` masks padding and seen items and takes
   ``metarec.ranking.top_k``.

``learner.adapt(frame)`` goes 1 -> 2 -> 3 (``adapt``) and returns ``users.py``'s
``AdaptedUser``, whose ``score`` / ``recommend`` call ``learner.runtime`` again (``stack`` in
``users.py`` passes a batch's device weights to the ``score`` program as they are).

Modules: ``requests`` (input forms and their checks), ``kernels`` (the compiled programs and
their cache), ``users`` (``AdaptedUser``), ``personalizer`` (``Personalizer``, the calls).
"""

from metarec.runtime.personalizer import Personalizer
from metarec.runtime.requests import EncodedCandidates, EncodedSupports, FlatSupports
from metarec.runtime.users import AdaptedUser

__all__ = ["AdaptedUser", "EncodedCandidates", "EncodedSupports", "FlatSupports", "Personalizer"]

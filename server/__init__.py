"""metarec's gRPC serving layer (API ``metarec.v1`` in ``protos/``).

Modules, one concept each:

* :mod:`server.app`: server assembly (health, reflection, TLS, auth, limits, graceful shutdown);
* :mod:`server.main`: the ``metarec serve`` command line (:func:`server.main.serve_main`);
* :mod:`server.workers`: ``--workers N``, several server processes on one port, supervised;
* :mod:`server.service`: the ``RecommenderService`` handlers;
* :mod:`server.validation`: request checks that map to precise status codes;
* :mod:`server.inference`: the model maths of one micro-batch (runs in a worker thread);
* :mod:`server.batcher`: micro-batching of concurrent requests;
* :mod:`server.cache`: bounded LRU of adapted users;
* :mod:`server.registry`: numbered model versions with a hot-reload watcher;
* :mod:`server.interaction_log`: the durable SQLite interaction log;
* :mod:`server.auth`: bearer-token interceptor;
* :mod:`server.codegen`: regenerates the committed stubs in ``server/_generated``.

Nothing here imports Keras or TensorFlow at import time: the model stack is imported only
when a model is loaded, so the log store and tooling start fast.
"""

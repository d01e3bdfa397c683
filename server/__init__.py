"""metarec's gRPC serving layer (API ``metarec.v1`` in ``protos/``).

This folder (``server/`` in the repository) installs as the package ``metarec_server``. It
depends on the SDK (``metarec``); the SDK never imports it, except ``metarec serve``, which
imports it when it runs. The API's Python stubs (``metarec.api.v1``) and the interaction log's
format (``metarec.interaction_log``) belong to the SDK: the client and ``metarec retrain`` use
them too.

Modules, one concept each:

* :mod:`metarec_server.app`: server assembly (health, reflection, TLS, auth, limits, graceful
  shutdown);
* :mod:`metarec_server.main`: the ``metarec serve`` command line
  (:func:`metarec_server.main.serve_main`);
* :mod:`metarec_server.workers`: ``--workers N``, several server processes on one port, supervised;
* :mod:`metarec_server.service`: the ``RecommenderService`` handlers;
* :mod:`metarec_server.validation`: request checks that map to precise status codes;
* :mod:`metarec_server.inference`: the model maths of one micro-batch (runs in a worker
  thread);
* :mod:`metarec_server.batcher`: micro-batching of concurrent requests;
* :mod:`metarec_server.cache`: bounded LRU of adapted users;
* :mod:`metarec_server.registry`: numbered model versions with a hot-reload watcher;
* :mod:`metarec_server.auth`: bearer-token interceptor;
* :mod:`metarec_server.codegen`: regenerates the committed stubs in ``metarec/api/``.

Nothing here imports Keras or TensorFlow at import time: the model stack is imported only
when a model is loaded, so the log store and tooling start fast.
"""

"""Scale-out on Ray Serve: many knn-ssd engines behind one OpenAI endpoint (``knn-ssd serve --replicas N``).

Imported only when Ray serves (``pip install -e ".[ray]"``); the single-process server never imports Ray.
Each replica runs the single-process server's own FastAPI app in-process (``asgi``), the ingress forwards
every request to one of them (``deployments``), chosen by prefix affinity (``request_router``), and
``/metrics`` merges every replica's series under a ``replica`` label (``metrics``).
"""

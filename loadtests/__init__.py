"""Load tests: Locust users for the served models, a headless runner, reports and capacity search.

The load generator speaks to the server over HTTP only. Locust itself is imported by
`locustfile.py` alone (it monkey-patches at import), which runs in a subprocess; the other
modules are plain Python and safe to import anywhere, tests included.
"""

"""Everything Temporal: the contract (:mod:`dispatcher.contract`), the client that signals the
dispatcher, the dispatcher workflow, the built-in task runner, their activities and the worker.

The core (``bridge``) never imports this package; ``bridge.runtime`` wires it in.
"""

"""The composition root: the only place that knows every adapter, the dispatcher and Temporal's client."""

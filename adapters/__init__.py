"""The doors: one module per transport, each turning its messages into events for the pipeline."""

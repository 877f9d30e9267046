"""The adapters: one module (or package) per transport, each turning its messages into events for the pipeline."""

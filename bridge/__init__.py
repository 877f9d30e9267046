"""signal-bridge: external events in, Temporal workflow runs out, each exactly once."""

__version__ = "0.1.0"

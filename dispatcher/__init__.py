"""The Temporal side: the dispatcher workflow, the built-in task runner, their activities, the worker."""

"""tuwunel-guard: move a compose deployment from Synapse to Tuwunel once the engine can run it."""

__version__ = "0.1.0"
